"""What the programs (`rlaif_jax.train`, `rlaif_jax.sft`, `rlaif_jax.reward_model_stage`) share around their loops:
multi-host start-up, logging, flag parsing that reports config mistakes as one line, stopping at a step boundary
on a signal (`Preemption`), the check that a batch splits over the mesh, and the check of data paths before
anything loads. Each program keeps its own flags, `main` and loop."""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

import jax
from absl import flags
from absl import logging as absl_logging

from rlaif_jax import data as data_lib
from rlaif_jax import errors

log = logging.getLogger("rlaif_jax")


class Preemption:
    """SIGTERM (the preemption notice of TPU VMs, SLURM and Kubernetes) and SIGINT (Ctrl-C) ask the loop to stop at
    the next step boundary: it saves a checkpoint of that step, says where the run will resume, and exits with
    128 + the signal's number. A second signal of the same kind acts at once (the default handler is back).

    On several processes every one must stop at the same step: there SIGTERM is left to JAX's preemption service
    (`jax.distributed` installs its notifier), and `multihost_utils.reached_preemption_sync_point(step)`, called at
    every step by every process, turns True on the same step everywhere. SIGINT is not intercepted there (Ctrl-C
    reaches one process only)."""

    def __init__(self):
        self.signum: int | None = None
        self.multihost = jax.process_count() > 1
        signals = () if self.multihost else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        del frame
        self.signum = signum
        signal.signal(signum, self._previous[signum])
        log.warning("%s received: stopping after the step in progress, with a checkpoint (send it again to stop "
                    "at once, without one)", signal.Signals(signum).name)

    def requested(self, step: int) -> bool:
        """Whether to stop after `step`; every process calls it at every step."""
        if self.multihost:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
        return self.signum is not None

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def maybe_initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Multi-host: `jax.distributed.initialize` from flags, or from the environment: JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID, or auto-detection on TPU pods (RLAIF_DISTRIBUTED=1, as
    scripts/launch_tpu_pod.sh sets) and SLURM. Must run before any other jax call."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    # CPU processes exchange collectives through gloo (accelerators use their own interconnect).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        num_processes = num_processes or int(env["JAX_NUM_PROCESSES"])
        process_id = process_id if process_id is not None else int(env["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif (env.get("RLAIF_DISTRIBUTED") == "1" or env.get("TPU_WORKER_HOSTNAMES")
          or ("SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1)):
        # TPU pods (the launcher sets RLAIF_DISTRIBUTED=1; the topology comes from the metadata server) and SLURM:
        # jax.distributed finds coordinator, process count and index by itself.
        jax.distributed.initialize()


def configure_logging() -> None:
    """Our own progress lines at INFO; the libraries' (orbax logs every checkpoint file) only from WARNING."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes (a typo in --config.x.y, a value of the wrong type) reported as
    one line that says what to change instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        errors.report(errors.ConfigError(message))


def check_data_paths(data_cfg) -> None:
    """A `config.data` path (and eval_path) that looks like a local file or folder exists; a hub name (org/name)
    is checked when it is fetched."""
    for setting, path in (("config.data.path", data_cfg.path), ("config.data.eval_path", data_cfg.eval_path)):
        if path and not data_lib._is_local(path) and (os.path.isabs(path) or path.startswith(("./", "../", "~"))
                                                       or os.path.splitext(path)[1] in data_lib._LOCAL_BUILDERS):
            raise errors.DataError(f"{setting}={path!r}: no such file or folder; fix the path (a hub dataset is "
                                   "named org/name)")


def check_batch_on_mesh(mesh_cfg, batch_size: int, grad_accum: int, setting: str, num_devices: int | None = None
                        ) -> None:
    """Raises ValueError (what to change) unless `config.mesh` covers the devices and a batch of `batch_size` rows
    (the config field `setting`) splits into `grad_accum` micro-batches of a size the mesh's batch shards divide."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    fsdp, tensor = mesh_cfg.fsdp, mesh_cfg.tensor
    data = mesh_cfg.data if mesh_cfg.data != -1 else num_devices // max(fsdp * tensor, 1)
    if data * fsdp * tensor != num_devices:
        raise ValueError(f"config.mesh data={mesh_cfg.data} x fsdp={fsdp} x tensor={tensor} does not match the "
                         f"{num_devices} devices; change config.mesh so the product is {num_devices}")
    shards = data * fsdp
    if batch_size % grad_accum or (batch_size // grad_accum) % shards:
        raise ValueError(f"{setting}={batch_size} cannot be split into optim.grad_accum={grad_accum} micro-batches "
                         f"of a size divisible by the mesh's batch shards (data x fsdp = {shards}); use a multiple "
                         f"of {grad_accum * shards}")


def run_stage_cli(launch: Callable[..., int], what: str, outputs: str) -> None:
    """The command line of a pipeline stage's program (sft.py, reward_model_stage.py): its flags (--config,
    --workdir, --allow_config_change, the multi-host ones) defined here, when the program runs, not on import
    (rlaif_jax.train defines flags of the same names in absl's global registry, and the modules are imported
    together in tests), then `launch(config, workdir, allow_config_change=..., distributed=...)`. `what` names
    the config file in --help, `outputs` what the workdir holds."""
    from absl import app
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, f"{what} config file (experiments/X.py[:arg])",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, f"run folder: {outputs}")
    coordinator = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
    num_processes = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    process_id = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
    allow_config_change = flags.DEFINE_bool(
        "allow_config_change", False, "resume although the config changed settings that alter what the run "
        "computes (model, data, batch, optimizer, ...)")

    def main(argv):
        del argv
        configure_logging()
        return launch(config.value, workdir.value, allow_config_change=allow_config_change.value,
                      distributed=(coordinator.value, num_processes.value, process_id.value))

    app.run(main, flags_parser=parse_flags)
