"""Start a recipe with one rank per GPU: ``torchrun`` on this machine, or ``srun`` + ``torchrun`` per node.

    python scripts/launch.py RECIPE [key.path=value ...] [--nodes N] [--gpus-per-node G]
                             [--master-port P] [--stopped-exit-code CODE] [--dry-run]

Where it runs decides the command:

* outside a SLURM allocation (no ``SLURM_JOB_ID``), one node only::

      torchrun --standalone --nproc-per-node G -m megatron_qad.cli train RECIPE ...

* inside one (``sbatch``, ``salloc``), any number of nodes: ``srun`` starts one ``torchrun`` per
  node and the ``torchrun`` agents meet at a c10d rendezvous on the first node of the allocation::

      srun --nodes N --ntasks-per-node 1 --kill-on-bad-exit=1 torchrun --nnodes N \\
          --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint FIRST_NODE:PORT \\
          --rdzv-id SLURM_JOB_ID -m megatron_qad.cli train RECIPE ...

  The rendezvous, rather than torchrun's static ``--node-rank $SLURM_NODEID`` form, makes the
  command the same on every node: ``srun`` runs it as it is, without a shell per node to expand
  a per-node variable, so what ``--dry-run`` prints is exactly what each node executes. Node ranks
  come from the rendezvous; torchrun then gives every process RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR and MASTER_PORT.

``torchrun`` runs with the signals of ``training.exit_signals`` that it does not handle itself
(SIGUSR1, SLURM's warning signal in ``scripts/slurm/qad.sbatch``) ignored: such a signal would
otherwise end ``torchrun`` at once, and with it the ranks, which stop the run cleanly on it (see
:func:`torchrun_unhandled`).

The variables of :data:`LAUNCH_ENVIRONMENT` are exported to every rank; a value already set in the
launching environment wins. Importing this module imports neither torch nor Megatron; loading the
recipe, before launching, does.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint_tracker import saved_iteration

PROG = "scripts/launch.py"
RANK_ENTRY = ("-m", "megatron_qad.cli", "train")
"""What ``torchrun`` starts in every rank, followed by the recipe and its overrides."""
BASE_PORT = 29500
"""The rendezvous port is ``BASE_PORT + SLURM_JOB_ID % 1000`` unless ``--master-port`` is given."""

LAUNCH_ENVIRONMENT: dict[str, tuple[str, str]] = {
    "CUDA_DEVICE_MAX_CONNECTIONS": (
        "1", "one GPU work queue keeps kernels in issue order, which Megatron's tensor/sequence-parallel "
             "communication overlap relies on"),
    "NCCL_DEBUG": (
        "WARN", "NCCL prints warnings and errors only; set NCCL_DEBUG=INFO to debug topology or hangs"),
    "NCCL_IB_TIMEOUT": (
        "22", "InfiniBand retry timeout of 4.096 us x 2^22 (about 17 s): rides out fabric congestion "
              "on large jobs instead of failing the collective"),
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": (
        "1", "a rank whose collective fails or times out exits, so the job ends instead of hanging"),
}
"""Variable -> (default value, why it is set) exported to every rank."""

TORCHRUN_HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
"""The signals torchrun handles unless ``TORCHELASTIC_SIGNALS_TO_HANDLE`` names others (torch's
default there; torch/distributed/elastic/multiprocessing/api.py, ``PContext.start``). On one of
them it sends it on to each rank's process group and kills the ranks left after 30 s."""

# Layout products that must divide the world size, as every rank checks at start-up
# (megatron_qad.parallel.check_world_size). Expert layers use tensor parallelism of the same size.
_LAYOUT_PRODUCTS = (
    ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"),
    ("tensor_model_parallel_size", "expert_model_parallel_size", "pipeline_model_parallel_size"),
)

_HOST_RANGE = re.compile(r"\[([^\[\]]*)\]")


class LaunchError(Exception):
    """The launch cannot start as asked; the message names the setting and the fix."""


@dataclass(frozen=True)
class LaunchPlan:
    """One command to run (``srun ...`` or ``torchrun ...``) and the variables added to its environment.

    ``runner``: ``srun`` and its options (empty on one machine); ``torchrun``: torchrun, its options
    and the rank program; ``ignored_signals``: signal names torchrun runs with ignored.
    """

    runner: list[str]
    torchrun: list[str]
    environment: dict[str, str]
    summary: str
    ignored_signals: tuple[str, ...] = ()

    @property
    def command(self) -> list[str]:
        """``runner``, then ``torchrun`` behind :func:`ignoring` its ``ignored_signals``."""
        return [*self.runner, *ignoring(self.ignored_signals), *self.torchrun]

    def format(self) -> str:
        """The plan as a shell script: comments (what runs, which signals torchrun ignores), one
        ``export`` per variable, the command."""
        comments = [f"# {self.summary}"]
        if self.ignored_signals:
            comments.append(f"# torchrun ignores {', '.join(self.ignored_signals)} (training.exit_signals it "
                            f"does not handle): the ranks' handlers stop the run, torchrun stays")
        exports = [f"export {name}={shlex.quote(value)}  # {LAUNCH_ENVIRONMENT[name][1]}"
                   for name, value in self.environment.items()]
        return "\n".join([*comments, *exports, shlex.join(self.command)])


# ---------------------------------------------------------------------------------------------
# SLURM host lists.


def _split_outside_brackets(text: str) -> list[str]:
    """Split ``text`` at the commas that are not inside ``[...]``."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise LaunchError(f"host list '{text}' has unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth:
        raise LaunchError(f"host list '{text}' has an unclosed '['")
    return parts + [text[start:]]


def _expand_range(item: str, pattern: str) -> list[str]:
    """``"01-03"`` -> 01, 02, 03 (the width of the first bound is kept); ``"7"`` -> 7."""
    first, sep, last = item.partition("-")
    if not first.isdigit() or (sep and not last.isdigit()):
        raise LaunchError(f"host list '{pattern}': '{item}' is not a number or a range like 01-04")
    if not sep:
        return [first]
    if int(last) < int(first):
        raise LaunchError(f"host list '{pattern}': range '{item}' runs backwards")
    return [str(number).zfill(len(first)) for number in range(int(first), int(last) + 1)]


def _expand_host(pattern: str) -> list[str]:
    """Expand one host pattern with any number of ``[...]`` groups (``rack[1-2]-n[01-02]``: 4 hosts)."""
    match = _HOST_RANGE.search(pattern)
    if match is None:
        return [pattern]
    prefix, rest = pattern[:match.start()], pattern[match.end():]
    numbers = [n for item in match.group(1).split(",") for n in _expand_range(item.strip(), pattern)]
    return [prefix + number + suffix for number in numbers for suffix in _expand_host(rest)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``node[01-03,7],gpu-a[1-2]`` -> node01 node02 node03 node7 gpu-a1 gpu-a2."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise LaunchError("the host list is empty")
    hosts = []
    for part in _split_outside_brackets(nodelist):
        if not part.strip():
            raise LaunchError(f"host list '{nodelist}' has an empty entry")
        hosts += _expand_host(part.strip())
    return hosts


# ---------------------------------------------------------------------------------------------
# Sizes from the environment.


def _env_count(env: Mapping[str, str], name: str, option: str) -> int:
    """The positive integer in variable ``name``; ``option`` is the command-line flag that overrides it."""
    text = env[name].rsplit(":", 1)[-1]  # SLURM_GPUS_PER_NODE may read "h100:8"
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"{name}={env[name]!r} is not a positive count; pass {option} N")
    return int(text)


def count_gpus() -> int | None:
    """Number of GPUs that ``nvidia-smi -L`` lists, or None without a working nvidia-smi or GPUs."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                                 check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(line.startswith("GPU ") for line in listing.splitlines()) or None


def default_nodes(env: Mapping[str, str]) -> int:
    """Nodes of the SLURM allocation (SLURM_NNODES, SLURM_JOB_NUM_NODES), else 1."""
    for name in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if name in env:
            return _env_count(env, name, "--nodes")
    return 1


def default_gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs per node: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, ``nvidia-smi -L``, else 1."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if name in env:
            return _env_count(env, name, "--gpus-per-node")
    return count_gpus() or 1


def launch_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The values of :data:`LAUNCH_ENVIRONMENT`, where a variable already set in ``env`` keeps its value."""
    return {name: env.get(name, default) for name, (default, _) in LAUNCH_ENVIRONMENT.items()}


# ---------------------------------------------------------------------------------------------
# Commands.


def torchrun_executable() -> str:
    """The ``torchrun`` next to this interpreter (same environment as the launcher), else the one on PATH."""
    beside = Path(sys.executable).parent / "torchrun"
    return str(beside) if beside.is_file() else "torchrun"


def torchrun_unhandled(exit_signals: Sequence[str], env: Mapping[str, str]) -> tuple[str, ...]:
    """The signals of ``exit_signals`` (``training.exit_signals``) that torchrun does not handle.

    torchrun installs handlers only for the signals of ``TORCHELASTIC_SIGNALS_TO_HANDLE`` (default
    :data:`TORCHRUN_HANDLED_SIGNALS`); any other keeps its default action there, which for SIGUSR1,
    SIGUSR2, SIGALRM and SIGXCPU ends the process. Under SLURM the warning signal reaches every
    process of the step, torchrun included, and once torchrun is gone slurmstepd kills whatever
    is left of the step, so the ranks would die in the middle of the save the signal asks for.
    """
    listed = env.get("TORCHELASTIC_SIGNALS_TO_HANDLE", TORCHRUN_HANDLED_SIGNALS)
    handled = {name.strip() for name in listed.split(",")}
    return tuple(name for name in exit_signals if name not in handled)


def ignoring(signals: Sequence[str]) -> list[str]:
    """A command prefix that runs the command after it with ``signals`` ignored (nothing if none).

    ``sh -c 'trap "" USR1; exec "$0" "$@"' torchrun ...``: the shell sets the signals to SIG_IGN
    and replaces itself with the command (same process, same pid). An ignored signal stays ignored
    across exec and fork, so torchrun's ranks start with it ignored too (Python's subprocess
    restores only SIGPIPE, SIGXFZ and SIGXFSZ); each rank then installs Megatron's handler for it
    with ``signal.signal`` (``DistributedSignalHandler.__enter__`` for the first exit signal,
    ``train.megatron._stop_on_extra_signals`` for the others), which replaces SIG_IGN.
    """
    if not signals:
        return []
    names = " ".join(name.removeprefix("SIG") for name in signals)  # POSIX trap takes USR1, not SIGUSR1
    return ["sh", "-c", f'trap "" {names}; exec "$0" "$@"']


def _rank_program(recipe: str, overrides: Sequence[str]) -> list[str]:
    """The arguments after torchrun's own: ``-m megatron_qad.cli train RECIPE overrides...``."""
    return [*RANK_ENTRY, recipe, *overrides]


def _standalone_plan(recipe: str, overrides: Sequence[str], gpus_per_node: int,
                     env: Mapping[str, str]) -> LaunchPlan:
    """One ``torchrun --standalone`` on this machine; it picks a free local rendezvous port itself."""
    torchrun = [torchrun_executable(), "--standalone", "--nproc-per-node", str(gpus_per_node),
                *_rank_program(recipe, overrides)]
    summary = (f"this machine: 1 node x {gpus_per_node} GPUs = {gpus_per_node} ranks "
               f"(torchrun --standalone picks a free local port)")
    return LaunchPlan([], torchrun, launch_environment(env), summary)


def _rendezvous_host(env: Mapping[str, str], nodes: int) -> str:
    """First host of SLURM_JOB_NODELIST, after checking that the allocation has ``nodes`` hosts."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: run inside the "
                          "allocation's batch script or salloc shell, where SLURM sets both")
    hosts = expand_nodelist(nodelist)
    if len(hosts) < nodes:
        raise LaunchError(f"SLURM_JOB_NODELIST '{nodelist}' has {len(hosts)} host(s), fewer than "
                          f"--nodes {nodes}: allocate {nodes} nodes (sbatch --nodes {nodes}) or pass "
                          f"--nodes {len(hosts)}")
    return hosts[0]


def _slurm_plan(recipe: str, overrides: Sequence[str], nodes: int, gpus_per_node: int,
                env: Mapping[str, str], master_port: int | None) -> LaunchPlan:
    """``srun`` starting one ``torchrun`` per node, meeting at a c10d rendezvous on the first node."""
    job_id = env["SLURM_JOB_ID"]
    if not job_id.isdigit():
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not a job number; run inside a SLURM allocation")
    port = BASE_PORT + int(job_id) % 1000 if master_port is None else master_port
    endpoint = f"{_rendezvous_host(env, nodes)}:{port}"
    runner = ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    torchrun = [torchrun_executable(), "--nnodes", str(nodes), "--nproc-per-node", str(gpus_per_node),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", job_id,
                *_rank_program(recipe, overrides)]
    summary = (f"SLURM job {job_id}: {nodes} node(s) x {gpus_per_node} GPUs = "
               f"{nodes * gpus_per_node} ranks, rendezvous at {endpoint}")
    return LaunchPlan(runner, torchrun, launch_environment(env), summary)


def build_plan(recipe: str, overrides: Sequence[str], nodes: int, gpus_per_node: int,
               env: Mapping[str, str], master_port: int | None = None) -> LaunchPlan:
    """The command that starts ``nodes`` x ``gpus_per_node`` ranks of ``megatron_qad.cli train RECIPE``.

    Inside a SLURM allocation (``SLURM_JOB_ID`` in ``env``): ``srun`` + ``torchrun`` per node, with
    the rendezvous on the first host of ``SLURM_JOB_NODELIST`` at ``master_port`` (default
    29500 + job id % 1000). Outside one: ``torchrun --standalone``, for one node only.
    """
    if "SLURM_JOB_ID" in env:
        return _slurm_plan(recipe, overrides, nodes, gpus_per_node, env, master_port)
    if nodes > 1:
        raise LaunchError(
            f"--nodes {nodes} needs a SLURM allocation and SLURM_JOB_ID is not set: submit with "
            f"'sbatch --nodes {nodes} scripts/slurm/qad.sbatch {recipe}' or run inside "
            f"'salloc --nodes {nodes}'; to only print the commands elsewhere, set SLURM_JOB_ID and "
            f"SLURM_JOB_NODELIST and pass --dry-run")
    return _standalone_plan(recipe, overrides, gpus_per_node, env)


# ---------------------------------------------------------------------------------------------
# Checks before launching, and the launch.


def load_recipe(recipe: str, overrides: Sequence[str]):
    """The recipe with its overrides (a :class:`megatron_qad.config.QADConfig`), checked as every
    rank checks it; LaunchError names what is wrong. It decides the launch too: the signals
    torchrun ignores, and (``--stopped-exit-code``) where the run's checkpoints are."""
    from .config import ConfigError, load_config

    # Validating the quantization section imports megatron.core, whose import-time notices
    # (Apex, Transformer Engine, no CUDA runtime on a login node) say nothing about the launch.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"megatron\.")
        try:
            return load_config(recipe, overrides)
        except ConfigError as err:
            raise LaunchError(f"recipe '{recipe}': {err}") from None


def check_parallel_layout(parallel, world_size: int) -> None:
    """Raise LaunchError if the recipe's ``parallel`` sizes do not tile ``world_size``: the rule
    every rank applies at start-up, here before any node starts."""
    for keys in _LAYOUT_PRODUCTS:
        sizes = [getattr(parallel, key) for key in keys]
        product = math.prod(sizes)
        if world_size % product:
            named = " x ".join(f"'parallel.{key}' ({size})" for key, size in zip(keys, sizes))
            raise LaunchError(
                f"{named} = {product} does not divide the world size {world_size} (--nodes x "
                f"--gpus-per-node); launch a multiple of {product} GPUs or change these sizes")


def stopped_early(code: int, checkpoint, train_iters: int, start: int | None) -> int | None:
    """The iteration a run stopped at, if the same command resumes it; else None.

    ``code``: the ranks' exit status; ``checkpoint``: the recipe's ``checkpoint`` section;
    ``start``: :func:`saved_iteration` before the run. A run stopped by an exit signal, the exit
    interval or the exit duration saves and exits 0 like a finished one; what tells them apart is
    its newest checkpoint, which is short of ``train_iters``. That checkpoint must be newer than
    ``start``: a run that saved nothing new would stop in the same place again.
    """
    if code or not checkpoint.save or not checkpoint.resume:
        return None
    end = saved_iteration(checkpoint.save)
    if end is None or end >= train_iters or (start is not None and end <= start):
        return None
    return end


def execute(plan: LaunchPlan) -> int:
    """Run the plan's command with its environment added; its exit status (128 + N if killed by signal N)."""
    try:
        process = subprocess.Popen(plan.command, env={**os.environ, **plan.environment})
    except FileNotFoundError:
        raise LaunchError(f"cannot start '{plan.command[0]}': not found on PATH (srun comes with the "
                          f"SLURM client tools, torchrun with torch)") from None
    with process:
        try:
            code = process.wait()
        except KeyboardInterrupt:  # the child got the same Ctrl-C: let it stop its ranks
            code = process.wait()
    return code if code >= 0 else 128 - code


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _exit_status(text: str) -> int:
    """argparse type: an exit status a process can return and that does not read as success, 1-255."""
    if not text.isdigit() or not 1 <= int(text) <= 255:
        raise argparse.ArgumentTypeError(f"expected an exit status from 1 to 255, got {text!r}")
    return int(text)


def _override(text: str) -> str:
    """argparse type: a ``section.key=value`` recipe override (load_config checks the key and value)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"'{text}' must look like section.key=value, "
                                         f"e.g. model.num_layers=2")
    return text


def _parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/launch.py``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Start 'megatron_qad.cli train RECIPE' with one rank per GPU: torchrun on this "
                    "machine, or srun + torchrun per node inside a SLURM allocation.")
    parser.add_argument("recipe", help="YAML recipe, e.g. configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", type=_override, metavar="KEY=VALUE",
                        help="recipe overrides, passed to every rank in order")
    parser.add_argument("--nodes", type=_positive_int, metavar="N",
                        help="nodes (default: SLURM_NNODES, else 1)")
    parser.add_argument("--gpus-per-node", type=_positive_int, metavar="G",
                        help="ranks per node (default: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, "
                             "the GPUs 'nvidia-smi -L' lists, else 1)")
    parser.add_argument("--master-port", type=_positive_int, metavar="P",
                        help=f"rendezvous port under SLURM (default: {BASE_PORT} + SLURM_JOB_ID %% 1000); "
                             f"a standalone run picks a free port")
    parser.add_argument("--stopped-exit-code", type=_exit_status, metavar="CODE",
                        help="exit with CODE instead of 0 when the run stopped early (exit signal, "
                             "interval or duration) and the same command resumes it: its newest "
                             "checkpoint is short of training.train_iters and newer than before the "
                             "run, and checkpoint.resume is on (scripts/slurm/qad.sbatch requeues the "
                             "job on it)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command and its environment, run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher's command line ``argv`` (default: sys.argv[1:]); return the exit code.

    0 or the launched command's exit status; 2 for a bad command line, recipe or allocation;
    ``--stopped-exit-code`` for a run to be resumed.
    """
    try:
        args = _parser().parse_intermixed_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and the error
        return int(exit_.code or 0)
    env = os.environ
    try:
        if not Path(args.recipe).is_file():
            raise LaunchError(f"recipe '{args.recipe}' not found; pass the path of a YAML recipe, "
                              f"e.g. configs/tiny_cpu.yaml")
        nodes = args.nodes or default_nodes(env)
        gpus_per_node = args.gpus_per_node or default_gpus_per_node(env)
        # The allocation's errors come before the seconds that loading the recipe takes.
        plan = build_plan(args.recipe, args.overrides, nodes, gpus_per_node, env, args.master_port)
        config = load_recipe(args.recipe, args.overrides)
        check_parallel_layout(config.parallel, nodes * gpus_per_node)
        plan = dataclasses.replace(plan, ignored_signals=torchrun_unhandled(config.training.exit_signals, env))
        print(plan.format(), flush=True)
        if args.dry_run:
            return 0
        checkpoint, train_iters = config.checkpoint, config.training.train_iters
        if args.stopped_exit_code and not (checkpoint.save and checkpoint.resume):
            print(f"{PROG}: note: 'checkpoint.save' unset or 'checkpoint.resume' off: a run that stops "
                  f"early exits 0, with nothing to resume", file=sys.stderr)
        start = saved_iteration(checkpoint.save)
        code = execute(plan)
        stopped_at = stopped_early(code, checkpoint, train_iters, start) if args.stopped_exit_code else None
        if stopped_at is None:
            return code
        print(f"{PROG}: the run stopped at iteration {stopped_at} of {train_iters}; the same command "
              f"resumes it from '{checkpoint.save}' (exit status {args.stopped_exit_code})", flush=True)
        return args.stopped_exit_code
    except LaunchError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
