"""``zreward train teacher|student``: GDSO and RISD from a user's annotation file and local model folder to a
deployable model folder (:mod:`zreward.train.run`), configured by :class:`~zreward.train.config.TeacherConfig` and
:class:`~zreward.train.config.StudentConfig`. Registering the subcommand imports nothing heavy."""
from zreward.train.cli import add_parser

__all__ = ["add_parser"]
