"""Algorithms, registered by name: ``algorithm.name`` in a config selects one."""

from gossamer.algorithms.base import Algorithm
from gossamer.algorithms.dl.choco import Choco
from gossamer.algorithms.dl.dfedsam import DFedSAM, DFedSAMMGS
from gossamer.algorithms.dl.dpsgd import DPSGD
from gossamer.algorithms.dl.gossip import GossipLearning
from gossamer.algorithms.dl.gradient_tracking import GradientTracking
from gossamer.algorithms.dl.grank import GRank
from gossamer.algorithms.dl.modest import MoDeST
from gossamer.algorithms.dl.random_walk import SRRW, RandomWalk
from gossamer.algorithms.fl.anarchic import AFACD, AFACS
from gossamer.algorithms.fl.async_fl import FedAsync, FedBuff, FedFix
from gossamer.algorithms.fl.co2 import CO2
from gossamer.algorithms.fl.diloco import DiLoCo
from gossamer.algorithms.fl.favano import FAVANO
from gossamer.algorithms.fl.fedamd import FedAMD
from gossamer.algorithms.fl.fedast import FedAST
from gossamer.algorithms.fl.fedavg import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedAvgMomentum,
    FedProx,
    FedYogi,
)
from gossamer.algorithms.fl.fedcompass import FedCompass
from gossamer.algorithms.fl.fedins import FedIns
from gossamer.algorithms.fl.fedpub import FedPub
from gossamer.algorithms.fl.general_theory import AsyncFedAvg
from gossamer.algorithms.fl.gradient_coding import GradientCoding, SequentialGradientCoding
from gossamer.algorithms.fl.isolated_experts import IsolatedExperts
from gossamer.algorithms.fl.personalized import Ditto, FedBN, FedCAC, FedRep, LocalOnly
from gossamer.algorithms.fl.scaffold import Scaffold, ScaffoldMomentum
from gossamer.algorithms.fl.streaming_diloco import StreamingDiLoCo
from gossamer.algorithms.fl.zo import ZOFedAvg
from gossamer.registry import Registry

ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
ALGORITHMS.register("fedavg")(FedAvg)
ALGORITHMS.register("fedprox")(FedProx)
ALGORITHMS.register("fedavgm")(FedAvgM)
ALGORITHMS.register("fedadagrad")(FedAdagrad)
ALGORITHMS.register("fedadam")(FedAdam)
ALGORITHMS.register("fedyogi")(FedYogi)
ALGORITHMS.register("fedavg_m")(FedAvgMomentum)
ALGORITHMS.register("diloco")(DiLoCo)
ALGORITHMS.register("streaming_diloco")(StreamingDiLoCo)
ALGORITHMS.register("co2")(CO2)
ALGORITHMS.register("ditto")(Ditto)
ALGORITHMS.register("local_only")(LocalOnly)
ALGORITHMS.register("fedrep")(FedRep)
ALGORITHMS.register("fedbn")(FedBN)
ALGORITHMS.register("fedcac")(FedCAC)
ALGORITHMS.register("fedpub")(FedPub)
ALGORITHMS.register("fedins")(FedIns)
ALGORITHMS.register("isolated_experts")(IsolatedExperts)
ALGORITHMS.register("scaffold")(Scaffold)
ALGORITHMS.register("scaffold_m")(ScaffoldMomentum)
ALGORITHMS.register("fedamd")(FedAMD)
ALGORITHMS.register("dpsgd")(DPSGD)
ALGORITHMS.register("dfedsam")(DFedSAM)
ALGORITHMS.register("dfedsam_mgs")(DFedSAMMGS)
ALGORITHMS.register("gradient_tracking")(GradientTracking)
ALGORITHMS.register("choco")(Choco)
ALGORITHMS.register("gossip")(GossipLearning)
ALGORITHMS.register("modest")(MoDeST)
ALGORITHMS.register("fedasync")(FedAsync)
ALGORITHMS.register("fedbuff")(FedBuff)
ALGORITHMS.register("fedfix")(FedFix)
ALGORITHMS.register("fedcompass")(FedCompass)
ALGORITHMS.register("afa_cd")(AFACD)
ALGORITHMS.register("afa_cs")(AFACS)
ALGORITHMS.register("async_fedavg")(AsyncFedAvg)
ALGORITHMS.register("favano")(FAVANO)
ALGORITHMS.register("fedast")(FedAST)
ALGORITHMS.register("random_walk")(RandomWalk)
ALGORITHMS.register("grank")(GRank)
ALGORITHMS.register("srrw")(SRRW)
ALGORITHMS.register("zo_fedavg")(ZOFedAvg)
ALGORITHMS.register("gradient_coding")(GradientCoding)
ALGORITHMS.register("sequential_gradient_coding")(SequentialGradientCoding)

__all__ = ["ALGORITHMS", "Algorithm", "DPSGD", "FedAvg", "GossipLearning", "MoDeST"]
