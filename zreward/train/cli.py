"""``zreward train teacher --config teacher.toml`` (GDSO) and ``zreward train student --config student.toml``
(RISD): train on an annotation file from a local model folder, on one process or under
``torchrun --nproc-per-node N -m zreward.cli train ...``.

``--print-config`` prints every key with its default and documentation; ``--dry-run`` checks the config and the
data, builds the model on the meta device and prints its parameters and the estimated memory per rank;
``--resume`` continues from the latest checkpoint in ``output_dir``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROLES = {"teacher": "GDSO (Algorithm 1): a reasoning teacher on same-prompt pairs",
         "student": "RISD (Algorithm 2): distil the teacher's score distributions into a student"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a reward model on an annotation file: teacher or student",
                                   description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    for role, what in ROLES.items():
        sub = roles.add_parser(role, help=what, description=f"zreward train {role}: {what}")
        sub.add_argument("--config", type=Path, help="run configuration (.toml or .json)")
        sub.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
        sub.add_argument("--print-config", action="store_true",
                         help="print every key with its default and documentation, as TOML, and exit")
        sub.add_argument("--dry-run", action="store_true",
                         help="check config and data, print parameters and estimated memory per rank, and exit")
        sub.add_argument("--world-size", type=int,
                         help="--dry-run: ranks to estimate for (default: torchrun's WORLD_SIZE, else 1)")
        sub.add_argument("--device-memory-gib", type=float,
                         help="--dry-run: memory of one device in GiB (default: this machine's GPU, if any)")
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from zreward.train.config import StudentConfig, TeacherConfig, config_template, load_config

    cls = TeacherConfig if args.role == "teacher" else StudentConfig
    if args.print_config:
        sys.stdout.write(config_template(cls))
        return 0
    prog = f"zreward train {args.role}"
    if args.config is None:
        raise SystemExit(f"{prog}: --config is required (--print-config shows every key)")
    from zreward.train.run import SetupError, setup_errors, train_student, train_teacher
    from zreward.training.distributed import shutdown_distributed

    try:
        with setup_errors():
            config = load_config(cls, args.config)
        if args.dry_run:
            from zreward.train.dry_run import dry_run

            world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            memory = None if args.device_memory_gib is None else int(args.device_memory_gib * 2**30)
            dry_run(config, world_size, memory)
        else:
            (train_teacher if args.role == "teacher" else train_student)(config, resume=args.resume)
    except SetupError as error:
        raise SystemExit(f"{prog}: {error}") from None
    finally:
        shutdown_distributed()
    return 0
