"""Whether a launcher (`mlx.launch`, mpirun) started this process as a rank, from the
environment alone: no MLX import, so a command can ask before anything heavy loads."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

# What mlx.launch (ring, jaccl) or mpirun set in each rank's environment.
LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched() -> bool:
    return any(k in os.environ for k in LAUNCH_ENV)


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free now (all bound before any is closed)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def loopback_hostfile(path: Path, n: int) -> Path:
    """Write an `mlx.launch` ring hostfile for `n` ranks on this machine to `path`: a process
    started with MLX_RANK=r and MLX_HOSTFILE=path is rank r of them."""
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    return path
