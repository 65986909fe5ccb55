"""Tasks from your own model and data (the command line's ``--model/--checkpoint/--data``).

``--model hf:DIR`` loads a Hugging Face ``save_pretrained`` folder (the class its
``config.json`` names, local files only: nothing is downloaded); ``--model pkg.module:factory``
imports exactly ``pkg.module`` (looked up on ``sys.path``, then in
the current folder) and calls ``factory()`` (with ``num_classes=`` when ``--num-classes`` is
given); ``--checkpoint FILE`` is loaded into it with ``torch.load(weights_only=True)``, so a
checkpoint can hold tensors only and never runs code. ``--data`` is read by
:mod:`autoshrink.data` at the model's input size and channels.

``--task cifar10 --data cifar10:DIR`` with no ``--model`` trains a ``resnet20`` teacher on first
use (a short schedule) and caches it under the cache folder, keyed by a hash of the data.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from autoshrink.data import SCHEMES, ImageData, load_data, read_cifar10
from autoshrink.task import Task, TaskError

__all__ = [
    "build_model",
    "cifar10_task",
    "custom_task",
    "load_checkpoint",
    "load_factory",
    "load_hf",
    "model_input_spec",
    "task_from_cli",
]

CIFAR10_TEACHER = "resnet20"
# A sound teacher, not a state-of-the-art one (no augmentation): an epoch of resnet20 on 50,000
# images took ~3.5 min on 2 CPU cores, so the first use costs ~15 min there; then it is cached.
CIFAR10_EPOCHS = 4


def task_from_cli(
    model: str | None,
    checkpoint: str | None,
    data: str | None,
    task: str | None,
    num_classes: int | None,
    *,
    input_size: int | tuple[int, int] | None = None,
    normalize: str = "train",
    data_workers: int | None = None,
    device: str = "cpu",
) -> Task:
    """Build the task the command line describes.

    Args:
        model: ``pkg.module:factory``, ``hf:DIR`` (a ``save_pretrained`` folder) or None.
        checkpoint: a state_dict file for ``model`` (``torch.save(model.state_dict(), path)``).
        data: ``imagefolder:DIR`` or ``cifar10:DIR``.
        task: ``cifar10`` (a teacher trained here when no ``model`` is given) or a name for
            your task in reports.
        num_classes: passed to the factory as ``num_classes=``.
        input_size: ``--input-size``: the side (or ``(height, width)``) image-folder images are
            cropped to; None: the model's own input size (:func:`model_input_spec`).
        normalize: ``--normalize train|imagenet`` for image folders (see
            :func:`autoshrink.data.read_imagefolder`).
        data_workers: DataLoader worker processes decoding image-folder images (None: default).
        device: where a teacher trained here (``--task cifar10``) is trained.

    Raises:
        TaskError: with a one-line reason naming the file or argument at fault.

    Example:
        >>> task = task_from_cli("mynet:build", "mynet.pt", "imagefolder:photos", None, None)  # doctest: +SKIP
    """
    if data is not None:
        _check_scheme(data)
    scheme, _, path = (data or "").partition(":")
    if model is None:
        if checkpoint is not None:
            raise TaskError("--checkpoint needs --model pkg.module:factory (the architecture to "
                            "load it into)")
        if task == "cifar10" or (task is None and scheme == "cifar10"):
            if data is None:
                raise TaskError("--task cifar10 needs --data cifar10:DIR (the CIFAR-10 python "
                                "batches; nothing is downloaded)")
            if scheme != "cifar10":
                raise TaskError(f"--task cifar10 reads cifar10:DIR data, got --data {data!r}")
            if num_classes not in (None, 10):
                raise TaskError(f"--num-classes {num_classes}: CIFAR-10 has 10 classes")
            return cifar10_task(path, device=device)
        raise TaskError(f"--data {data!r} needs --model pkg.module:factory (and --checkpoint) to "
                        "compress; only --task cifar10 trains a teacher of its own")
    if data is None:
        raise TaskError("--model needs --data imagefolder:DIR or cifar10:DIR (the data to "
                        "fine-tune and validate on)")
    net = build_model(model, num_classes)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint, model=model)
    name = task or model.partition(":")[2] or "custom"
    return custom_task(net, data, name=name, source=model, input_size=input_size, normalize=normalize,
                       num_workers=data_workers)


def _check_scheme(data: str) -> None:
    scheme, sep, path = data.partition(":")
    if not sep or scheme not in SCHEMES or not path:
        load_data(data)  # raises the one-line error for this spec


# -- model ------------------------------------------------------------------------------------------
def load_factory(spec: str) -> Callable[..., nn.Module]:
    """Import ``pkg.module`` and return its ``factory`` attribute, for ``spec = "pkg.module:factory"``.

    The module is imported by name with :func:`importlib.import_module` (no ``eval``); if it is
    not importable from ``sys.path``, the current folder is tried too. (The search ships the
    modules of a model from outside the installed packages to its Ray workers.)

    Raises:
        TaskError: malformed spec, module not importable, no such attribute, not callable.

    Example:
        >>> load_factory("autoshrink.models:create").__name__
        'create'
    """
    module_name, sep, attr = spec.partition(":")
    parts = module_name.split(".")
    if not sep or not all(p.isidentifier() for p in parts) or not all(
        a.isidentifier() for a in attr.split(".")
    ):
        raise TaskError(f"--model {spec!r}: expected pkg.module:factory, e.g. mynets.small:build")
    module = _import(module_name, spec)
    obj = module
    for a in attr.split("."):
        if not hasattr(obj, a):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = difflib.get_close_matches(attr, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" It defines: {names[:8]}"
            raise TaskError(f"--model {spec!r}: module {module_name!r} ({module.__file__}) has no "
                            f"{attr!r}.{hint}")
        obj = getattr(obj, a)
    if not callable(obj):
        raise TaskError(f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not a factory function")
    return obj


def _import(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        missing_is_ours = exc.name is not None and module_name.startswith(exc.name)
        if not missing_is_ours or here in sys.path:
            raise TaskError(f"--model {spec!r}: cannot import {module_name!r}: {exc}") from exc
        sys.path.insert(0, here)  # like `python -m`: your own modules next to where you run it
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as again:
            sys.path.remove(here)
            raise TaskError(
                f"--model {spec!r}: cannot import {module_name!r} ({again}); run from the folder "
                "that contains it, or install it"
            ) from again
        except Exception as err:  # the user's module failed while importing
            raise TaskError(f"--model {spec!r}: importing {module_name!r} failed: "
                            f"{type(err).__name__}: {err}") from err
    except Exception as exc:  # the user's module failed while importing
        raise TaskError(f"--model {spec!r}: importing {module_name!r} failed: "
                        f"{type(exc).__name__}: {exc}") from exc


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Call the factory named by ``spec`` (see :func:`load_factory`), with ``num_classes`` if given.

    Raises:
        TaskError: factory not found, takes no ``num_classes``, fails, or returns no nn.Module.

    Example:
        >>> build_model("autoshrink.models.resnet:resnet20", num_classes=3).fc.out_features
        3
    """
    if spec.startswith("hf:"):
        return load_hf(spec.removeprefix("hf:"), num_classes)
    factory = load_factory(spec)
    kwargs = {}
    if num_classes is not None:
        if not _accepts(factory, "num_classes"):
            raise TaskError(f"--num-classes {num_classes}: {spec} takes no num_classes argument")
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's factory
        raise TaskError(f"--model {spec!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise TaskError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_hf(folder: str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """A Hugging Face model from a local ``save_pretrained`` folder (``--model hf:DIR``).

    The class named in its ``config.json`` (``architectures``) is used, else
    ``AutoModelForImageClassification`` then ``AutoModelForSequenceClassification``; only local
    files are read and no remote code runs.

    Raises:
        TaskError: no such folder, no ``config.json``, transformers not installed, a model that
            cannot be loaded, or ``num_classes`` other than the saved model's labels.

    Example:
        >>> model = load_hf("my-vit")   # doctest: +SKIP
    """
    what = f"--model hf:{folder}"
    path = Path(folder)
    if not path.is_dir():
        raise TaskError(f"{what}: no such folder (a folder written by model.save_pretrained(DIR))")
    if not (path / "config.json").is_file():
        raise TaskError(f"{what}: no config.json in the folder; write it with model.save_pretrained(DIR)")
    try:
        import transformers
    except ImportError:
        raise TaskError(f"{what} needs the transformers package: pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
        classes = [c for c in named if c is not None] or [
            transformers.AutoModelForImageClassification, transformers.AutoModelForSequenceClassification]
        errors = []
        for cls in classes:
            try:
                model = cls.from_pretrained(path, local_files_only=True)
                break
            except (ValueError, KeyError, OSError) as exc:  # a class that does not fit this config
                errors.append(f"{cls.__name__}: {exc}")
        else:
            raise TaskError(f"{what}: cannot load it: {'; '.join(errors)[:300]}")
    except TaskError:
        raise
    except Exception as exc:  # transformers raises many types for a damaged folder
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise TaskError(f"{what}: cannot load it ({type(exc).__name__}: {first[:200]})") from exc
    labels = getattr(model.config, "num_labels", None)
    if num_classes is not None and labels is not None and num_classes != labels:
        raise TaskError(f"--num-classes {num_classes}: the model in {folder} has {labels} labels")
    return model.eval()


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell (a builtin): let the call decide
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def load_checkpoint(net: nn.Module, path: str | os.PathLike, *, model: str | None = None) -> nn.Module:
    """Load a state_dict file into ``net`` with ``torch.load(weights_only=True)``.

    Accepts a raw state_dict, or a dict holding one under ``"state_dict"`` or ``"model"``; a
    ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix on every key is dropped.

    Args:
        net: the freshly built model.
        path: the checkpoint file.
        model: the ``--model`` spec, named in errors.

    Raises:
        TaskError: missing file, unreadable or non-tensor content, or a checkpoint for another
            architecture (naming the first missing/unexpected keys and mismatching shapes).

    Example:
        >>> load_checkpoint(net, "mynet.pt", model="mynet:build")  # doctest: +SKIP
    """
    import pickle

    p = Path(path)
    what = f"--checkpoint {p}"
    if p.is_dir():
        raise TaskError(f"{what} is a folder, not a checkpoint file: name the .pt file in it")
    if not p.is_file():
        raise TaskError(f"{what}: no such file")
    if p.stat().st_size == 0:
        raise TaskError(f"{what} is an empty file (0 bytes): was the save interrupted? Save it again "
                        "with torch.save(model.state_dict(), path)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # not a refused object: a damaged file
            raise TaskError(f"{what}: not a readable torch checkpoint (the file is damaged or "
                            "not a torch.save file)") from None
        # torch's own message suggests weights_only=False: unsafe advice for a file we don't trust
        raise TaskError(f"{what}: cannot be loaded with weights_only=True (it holds objects that "
                        "only code from the file could rebuild); save model.state_dict() with "
                        "torch.save instead of the whole model") from None
    except Exception as exc:  # torch raises many types for damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TaskError(f"{what}: not a readable torch checkpoint ({type(exc).__name__}: "
                        f"{first[:200]})") from exc
    state = _state_dict_of(obj, what)
    _check_fits(net, state, what, model)
    net.load_state_dict(state, strict=True)
    return net.eval()


def _state_dict_of(obj, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        keys = list(obj)[:5] if isinstance(obj, Mapping) else []
        raise TaskError(f"{what}: expected a state_dict (names -> tensors), or a dict with one "
                        f"under 'state_dict' or 'model'; got a {type(obj).__name__}"
                        + (f" with keys {keys}" if keys else ""))
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _check_fits(net: nn.Module, state: dict[str, torch.Tensor], what: str, spec: str | None) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        k, theirs, ours = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        parts.append(f"{k!r} is {theirs} in the checkpoint but {ours} in the model{more}")
    if missing:
        parts.append(f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}"
                     + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
    hint = ""
    if shapes and not missing and not unexpected and all(t[1:] == o[1:] for _, t, o in shapes):
        hint = f"; a different --num-classes (the checkpoint has {shapes[0][1][0]})?"
    target = f"--model {spec}" if spec else type(net).__name__
    raise TaskError(f"{what} is for another architecture than {target}: " + "; ".join(parts) + hint)


def model_input_spec(model: nn.Module) -> tuple[int, tuple[int, int]]:
    """The model's input channels and ``(height, width)``.

    From ``default_cfg``/``pretrained_cfg["input_size"]`` (zoo and timm models) when present;
    otherwise channels from an ``in_chans`` attribute or the first Conv2d, and size from an
    ``img_size``/``input_size`` attribute, else 32x32.

    Example:
        >>> from autoshrink import models
        >>> model_input_spec(models.create("resnet20", in_chans=3))
        (3, (32, 32))
    """
    for attr in ("default_cfg", "pretrained_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
        if isinstance(size, tuple | list) and len(size) == 3:
            return int(size[0]), (int(size[1]), int(size[2]))
    config = getattr(model, "config", None)  # a Hugging Face vision model
    if isinstance(getattr(config, "num_channels", None), int) and isinstance(getattr(config, "image_size", None), int):
        return config.num_channels, (config.image_size, config.image_size)
    chans = getattr(model, "in_chans", None)
    if not isinstance(chans, int):
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        chans = first.in_channels if first is not None else 3
    hw = (32, 32)
    for attr in ("img_size", "input_size"):
        v = getattr(model, attr, None)
        if isinstance(v, int):
            hw = (v, v)
            break
        if isinstance(v, tuple | list) and len(v) in (2, 3) and all(isinstance(i, int) for i in v):
            hw = (int(v[-2]), int(v[-1]))
            break
    return chans, hw


# -- tasks ------------------------------------------------------------------------------------------
def custom_task(model: nn.Module, data: str | ImageData, *, name: str = "custom",
                source: str | None = None, input_size: int | tuple[int, int] | None = None,
                normalize: str = "train", num_workers: int | None = None) -> Task:
    """A task from a trained model and ``imagefolder:DIR`` / ``cifar10:DIR`` data.

    ``input_size`` (default: the model's own, :func:`model_input_spec`), ``normalize`` and
    ``num_workers`` apply to an image folder (see :func:`autoshrink.data.read_imagefolder`).

    Raises:
        TaskError: the data cannot be read, or the model's outputs do not match its classes.

    Example:
        >>> task = custom_task(my_model, "imagefolder:photos")  # doctest: +SKIP
    """
    from autoshrink.tasks.transforms import input_hw

    chans, size = model_input_spec(model)
    if input_size is not None:
        size = input_hw(input_size)
    images = data if isinstance(data, ImageData) else load_data(
        data, in_chans=chans, size=size, normalize=normalize, num_workers=num_workers)
    example = images.val[0][0].unsqueeze(0)
    task = Task(model=model.eval(), train_data=images.train, val_data=images.val,
                example_input=example, name=name,
                description=f"{images.description}; teacher {source or type(model).__name__}")
    if task.num_classes != len(images.classes):
        shown = images.classes[:5] + (["..."] if len(images.classes) > 5 else [])
        raise TaskError(f"the model outputs {task.num_classes} classes but the data has "
                        f"{len(images.classes)} ({', '.join(shown)}); build the model for "
                        f"{len(images.classes)} classes (--num-classes {len(images.classes)})")
    return task


def cifar10_task(root: str | os.PathLike, *, epochs: int | None = None, progress: bool = True,
                 device: str = "cpu") -> Task:
    """CIFAR-10 from its python batches, with a ``resnet20`` teacher trained here on first use.

    The teacher is cached under the cache folder (``AUTOSHRINK_CACHE``), keyed by a hash of the
    decoded data, the schedule and the torch version; it is loaded with ``weights_only=True``.

    Args:
        root: the folder with ``data_batch_1..5``, ``test_batch``, ``batches.meta``.
        epochs: teacher training epochs (default 4; ``AUTOSHRINK_TEACHER_EPOCHS`` overrides).
        progress: show a progress bar while training.
        device: where a teacher not yet cached is trained and first evaluated (see
            :func:`autoshrink.device.resolve_device`); the task's model is on the CPU either way.

    Example:
        >>> task = cifar10_task("data/cifar-10-batches-py")  # doctest: +SKIP
    """
    from autoshrink import models
    from autoshrink._env import cache_dir
    from autoshrink.tasks._teacher_cache import cached_teacher
    from autoshrink.tasks.digits import train_teacher

    epochs = epochs or int(os.environ.get("AUTOSHRINK_TEACHER_EPOCHS", str(CIFAR10_EPOCHS)))
    data = read_cifar10(root, in_chans=3)
    key = hashlib.sha1(f"{data.digest}-e{epochs}-{torch.__version__}".encode()).hexdigest()[:12]

    def train(teacher: nn.Module) -> float:
        train_teacher(teacher, data, epochs=epochs, batch_size=128, lr=0.1, progress=progress,
                      label=f"training the CIFAR-10 teacher ({CIFAR10_TEACHER}, {epochs} epochs; "
                            "first use only, cached)", device=device)
        accuracy, _ = Task(teacher, data.train, data.val, data.val[0][0].unsqueeze(0)).evaluate(teacher, device=device)
        return accuracy

    teacher, accuracy = cached_teacher(
        cache_dir() / "teachers" / f"cifar10-{CIFAR10_TEACHER}-{key}.pt",
        lambda: models.create(CIFAR10_TEACHER, num_classes=len(data.classes), in_chans=3),
        train,
        retrain_damaged=True,  # a damaged cache entry is retrained, never trusted
    )
    return Task(
        model=teacher.eval(),
        train_data=data.train,
        val_data=data.val,
        example_input=data.val[0][0].unsqueeze(0),
        name="cifar10",
        teacher_accuracy=accuracy,
        description=f"{data.description}; teacher {CIFAR10_TEACHER} trained here for {epochs} epochs",
    )
