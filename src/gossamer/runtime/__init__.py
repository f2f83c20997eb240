"""The runtime: the simulator's algorithms on real processes over gRPC (issue 3, in progress).

Implemented so far: the wire schema (``schema``), tensor framing with validation and caps
(``codec``), and security (``security``: TLS, mutual TLS, tokens, certificates).
"""
