"""Plan -> per-rank programs, p2p to any rank, and the executor shared by the backends."""
