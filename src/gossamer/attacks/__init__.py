"""Byzantine attacks, selectable by name.

Model attacks craft the update a Byzantine node sends (``apply_attack``); data attacks poison
what it trains on (``label_flip`` with ``flip_labels``). Every name, of both kinds, is in
``ATTACKS`` so that configs are validated alike (``check_attack_params``).

Updates are vectors relative to a reference the functions never see (FL: client model minus
global model; DL: neighbour model minus the receiver's model), stacked as ``[G, B, P]``: group
g is what one receiver gets, attacked independently, so in DL one attacker may send different
updates to different neighbours. Statistics are computed in float64 over the honest rows of a
group (an omniscient attacker), or over all its rows when it has none; the std is the sample
std (ddof = 1, as ``torch.std`` in the papers' code), 0 for fewer than two rows.

Attacks (parameters and defaults):
    - ``sign_flip(scale=1.0)``: ``-scale * own``; ``scaling(scale=10.0)``: ``scale * own``.
    - ``gaussian(sigma=1.0)``: an independent ``N(0, sigma^2 I)`` draw per Byzantine row.
    - ``alie(z=None)``: ``mean - z * std``; ``z`` defaults to the paper's ``z_max``.
    - ``ipm(epsilon=0.1)``: ``-epsilon * mean``.
    - ``min_max`` / ``min_sum(perturbation="std", gamma_init=10.0, tau=1e-5, max_iter=100)``.
    - ``free_rider(sigma=0.0)``: the model received, unchanged (a zero update), or plus
      ``N(0, sigma^2 I)`` noise (a disguised free-rider).
    - ``label_flip``: data attack, ``y -> num_classes - 1 - y``.
    - ``label_noise(rate=1.0)``: data attack, each label drawn uniformly with probability ``rate``.

Definitional choices:
    - Groups without honest rows take statistics over all their rows (the attackers' own
      honest updates); a group with fewer than two such rows has std 0.
    - ALIE: ``n`` is the group size B, ``f`` its number of Byzantine rows; when the attackers
      hold a majority (``s <= 0``) ``s`` is taken as 1, and ``z >= 0`` (``alie_z``).
    - Min-Max / Min-Sum: the paper's halving search, so ``gamma`` is within ``2 * tau`` below
      the largest feasible value and below ``2 * gamma_init``; Min-Sum's bound is the
      paper's ``max_i`` (the authors' code uses ``min_i``). Details in ``attacks.min_max``.
    - ``gaussian`` draws ``[K, P]`` normals on the generator's device (K Byzantine rows, in
      row-major order); with no Byzantine row no attack runs and nothing is drawn.

References: ALIE (Baruch, Baruch, Goldberg, NeurIPS 2019, arXiv:1902.06156); IPM (Xie,
Koyejo, Gupta, UAI 2019, arXiv:1903.03936); Min-Max / Min-Sum (Shejwalkar, Houmansadr,
NDSS 2021). ``sign_flip``, ``scaling``, ``gaussian`` and ``label_flip`` are folklore baselines.
"""

from gossamer.attacks import min_max, model  # noqa: F401  (registers the attacks)
from gossamer.attacks.core import ATTACKS, apply_attack, check_attack_params
from gossamer.attacks.data import DATA_ATTACKS, flip_labels
from gossamer.attacks.model import alie_z

MODEL_ATTACKS = frozenset(name for name in ATTACKS if name not in DATA_ATTACKS)

__all__ = [
    "ATTACKS",
    "DATA_ATTACKS",
    "MODEL_ATTACKS",
    "alie_z",
    "apply_attack",
    "check_attack_params",
    "flip_labels",
]
