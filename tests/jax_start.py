"""How the several-device check scripts (sharded_checks.py, training_checks.py) start JAX, before
anything else touches it: JAX fixes its devices when it starts."""

from __future__ import annotations

import jax


def start_jax(argv: list[str]) -> str:
    """``argv[1]`` is the mode. ``process I N PORT ...``: process I of an N-process jax.distributed job on
    127.0.0.1:PORT, with 2 CPU devices each (gloo collectives); any other mode: 8 virtual CPU devices.
    Returns the mode."""
    mode = argv[1]
    if mode == "process":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_num_cpu_devices", 2)
        process_id, num_processes, port = (int(a) for a in argv[2:5])
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=120,
        )
    else:
        jax.config.update("jax_num_cpu_devices", 8)
    return mode
