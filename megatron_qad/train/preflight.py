"""Checks of a recipe's paths that run before any model is built, so that a run fails in its first
second with a one-line :class:`~megatron_qad.config.ConfigError` naming the recipe key, instead of
after a teacher was trained or a model loaded.

- :func:`check_teacher_checkpoint`: ``teacher.checkpoint`` is a complete dist checkpoint, or a
  path that does not exist yet where ``teacher.pretrain_iters`` > 0 trains one;
- :func:`check_output_dir`: a directory the run will write (``export.dir``) can be created.
"""

from pathlib import Path

from ..config import ConfigError, QADConfig
from .checkpoint_checks import check_checkpoint_files


def check_teacher_checkpoint(config: QADConfig) -> bool:
    """Check ``teacher.checkpoint`` as :class:`~megatron_qad.config.TeacherConfig` documents it;
    return True when a teacher is to be trained there first (``teacher.pretrain_iters`` > 0 and
    the path does not exist), False when one is to be loaded from there.

    Raises ConfigError when the key is null; when the path exists but is not a complete dist
    checkpoint (an empty directory, e.g. a copy that failed, or one without ``metadata.json``:
    nothing is trained into an existing directory); when a file of the checkpoint is missing or
    cut short (:func:`~.checkpoint_checks.check_checkpoint_files`); when the path does not exist
    and ``teacher.pretrain_iters`` is 0; and when a regular file stands where its directory
    would be created. Whether the checkpoint's tensors fit the recipe's model is checked when it
    is loaded (``checkpointing.load_model``). Call it on every rank; it only reads."""
    teacher = config.teacher
    if teacher.checkpoint is None:
        raise ConfigError("'teacher.checkpoint' is not set: give the megatron.core dist checkpoint of the BF16 "
                          "teacher (or a directory to train a small one in, with teacher.pretrain_iters)")
    path = Path(teacher.checkpoint).expanduser()
    if path.is_dir():
        if not (path / "metadata.json").is_file():
            contents = "is empty" if not any(path.iterdir()) else "holds no metadata.json"
            raise ConfigError(f"'teacher.checkpoint' ({path}) {contents}: it is not a megatron.core dist checkpoint. "
                              f"Point it at one, or remove the directory to have teacher.pretrain_iters train a "
                              f"teacher there (nothing is trained into an existing directory)")
        check_checkpoint_files(path)
        return False
    if path.exists():
        raise ConfigError(f"'teacher.checkpoint' ({path}) is a file, not a dist checkpoint directory; point it "
                          f"at the directory of a megatron.core dist checkpoint")
    if teacher.pretrain_iters == 0:
        raise ConfigError(f"'teacher.checkpoint' ({path}) does not exist; point it at the teacher's dist "
                          f"checkpoint, or set teacher.pretrain_iters > 0 to train a small teacher there")
    check_output_dir(path, "teacher.checkpoint")
    return True


def check_output_dir(path: str | Path, key: str) -> None:
    """Raise ConfigError naming recipe key ``key`` unless directory ``path`` exists or can be
    created: ``path`` itself and every existing parent must be directories (a regular file on the
    way makes ``mkdir`` fail only after the model was loaded). Returns None."""
    path = Path(path).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                where = "is" if place == path else f"lies under {place}, which is"
                raise ConfigError(f"'{key}' ({path}) {where} a regular file, not a directory; "
                                  f"choose another {key}")
            return
