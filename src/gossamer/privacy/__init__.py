"""Privacy: differential privacy (client and sample level) with accounting; secure aggregation."""

from gossamer.privacy.accounting import BufferLedger, DPLedger, epsilon, sample_ledger
from gossamer.privacy.dp import clip_rows, dp_fedavg_updates, gaussian
from gossamer.privacy.secagg_server import SecAggResult, SecureMean, run_protocol, secure_mean

__all__ = ["BufferLedger", "DPLedger", "sample_ledger", "SecAggResult", "SecureMean", "clip_rows", "dp_fedavg_updates", "epsilon",
           "gaussian", "run_protocol", "secure_mean"]
