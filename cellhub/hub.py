"""Save, load and publish cellhub checkpoints on the Hugging Face Hub.

Every checkpoint is a folder (or Hub repo) with ``config.json``, safetensors weights and a
``README.md`` model card, and loads with the tools people already use:

* timm models (resnet18/resnet50/vgg16): ``config.json`` is in timm's Hub format (architecture,
  num_classes, label_names, pretrained_cfg) and is also read by ``transformers``' TimmWrapper:
  ``timm.create_model("hf-hub:org/name", pretrained=True)``,
  ``transformers.pipeline("image-classification", model="org/name")``;
* the small CNN: ``huggingface_hub.PyTorchModelHubMixin`` format, ``SmallCNN.from_pretrained``;
* the SVM baseline: :class:`cellhub.svm.SVMClassifier` (safetensors + JSON);
* all of them: :func:`load_pretrained`.

Security: only safetensors are ever read. A checkpoint that holds only pickle files
(``pytorch_model.bin`` ...) is refused; pickles are never downloaded, loaded or uploaded.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache import atomic_write_json, read_json, to_jsonable
from .modelcard import CARD_NAME, build_model_card
from .models import SMALLCNN_ARCHITECTURE, SmallCNN, data_config_from_pretrained_cfg
from .svm import SAFE_DOWNLOAD_PATTERNS, SVMClassifier, is_svm_config

__all__ = [
    "HubError",
    "UnsafeCheckpointError",
    "build_model_card",  # re-exported from cellhub.modelcard
    "load_pretrained",
    "push_to_hub",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Files uploaded by :func:`push_to_hub` (top level of the folder only); downloads fetch the same kinds.
UPLOAD_PATTERNS = SAFE_DOWNLOAD_PATTERNS
#: Weight formats that execute code when loaded; never read, never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt", ".h5", ".msgpack", ".npy")
#: Result files written by training into the checkpoint folder.
RESULT_FILES = ("metrics.json", "history.json")


class HubError(RuntimeError):
    """A Hub operation failed for a reason the user can fix (token, network, permissions)."""


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds only pickle weights, which cellhub refuses to load."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    """The plain model inside torch.compile / DistributedDataParallel / DataParallel wrappers."""
    for _ in range(4):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model


def _kind(model: Any) -> str:
    """'svm' | 'smallcnn' | 'timm'."""
    if isinstance(model, SVMClassifier):
        return "svm"
    if isinstance(model, SmallCNN):
        return "smallcnn"
    if isinstance(getattr(model, "pretrained_cfg", None), Mapping) and hasattr(model, "get_classifier"):
        return "timm"
    raise TypeError(f"Don't know how to save a {type(model).__name__}; expected a model from "
                    "cellhub.create_model, a SmallCNN or an SVMClassifier.")


def _metrics_summary(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not metrics:
        return None
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "ece", "ci95", "macro_f1_ci95",
            "n_images", "n_groups", "split")
    return {k: metrics[k] for k in keys if k in metrics}


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    # format=pt: transformers refuses safetensors files without it.
    save_model(model, str(path), metadata={"format": "pt"})


def _timm_config(model: nn.Module, labels: list[str]) -> dict[str, Any]:
    """timm's Hub ``config.json`` layout, readable by transformers' TimmWrapperConfig too.

    Unlike ``timm.models.save_for_hf``, ``num_classes`` is *not* repeated in ``model_args``:
    transformers passes ``num_classes=config.num_labels`` itself and would fail with
    "got multiple values for keyword argument 'num_classes'".
    """
    pcfg = dict(model.pretrained_cfg)
    drop = {"url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "architecture",
            "label_names", "label_descriptions", "test_input_size", "test_crop_pct", "test_pool_size",
            "hf_hub_revision", "deprecated"}
    out_pcfg = {k: v for k, v in pcfg.items() if k not in drop and v is not None}
    out_pcfg.update(data_config_from_pretrained_cfg(pcfg))
    out_pcfg["num_classes"] = len(labels)
    config: dict[str, Any] = {
        "architecture": pcfg.get("architecture") or model.cellhub_config.get("architecture"),
        "num_classes": len(labels),
        "num_features": int(getattr(model, "num_features", 0)) or None,
        "label_names": list(labels),
        "pretrained_cfg": out_pcfg,
    }
    gp = getattr(model, "global_pool", None)
    pool_type = getattr(gp, "pool_type", None)
    if isinstance(pool_type, str) and pool_type:
        config["global_pool"] = pool_type
    return to_jsonable(config)


def _cellhub_section(model: Any, recipe: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None,
                     license: str | None) -> dict[str, Any]:
    section = dict(getattr(model, "cellhub_config", None) or {})
    if recipe is not None:
        section["recipe"] = dict(recipe)
    if license is not None:
        section["license"] = license
    summary = _metrics_summary(metrics)
    if summary is not None:
        section["metrics"] = summary
    return to_jsonable(section)


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def save_pretrained(
    model: Any,
    directory: str | Path,
    *,
    metrics: Mapping[str, Any] | None = None,
    history: Any = None,
    extra_files: Iterable[str | Path] | None = None,
    recipe: Mapping[str, Any] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``model`` to ``directory`` as a Hub-ready checkpoint and (re)generate its model card.

    Writes ``model.safetensors`` (SVM: ``svm.safetensors`` + ``backbone.safetensors``) and
    ``config.json`` with a ``"cellhub"`` section (labels, preprocessing, recipe, metric
    summary). ``metrics``/``history`` are written to ``metrics.json``/``history.json`` when given;
    otherwise those files are read from the folder if training already wrote them.
    ``extra_files`` (e.g. plots) are copied in. ``recipe`` is stored under
    ``config["cellhub"]["recipe"]`` (default: ``model.cellhub_config["recipe"]``).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    kind = _kind(model)
    if metrics is not None:
        atomic_write_json(d / "metrics.json", metrics, indent=2)
    else:
        metrics = read_json(d / "metrics.json")
    if history is not None:
        atomic_write_json(d / "history.json", history, indent=2)
    for f in extra_files or ():
        src = Path(f)
        if not src.is_file():
            raise FileNotFoundError(f"extra file {src} does not exist")
        if src.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeCheckpointError(f"Refusing to add {src.name}: pickle files are never published.")
        if src.resolve() != (d / src.name).resolve():
            shutil.copy2(src, d / src.name)

    existing = (read_json(d / CONFIG_NAME) or {}).get("cellhub", {})
    if recipe is None:
        recipe = (getattr(model, "cellhub_config", None) or {}).get("recipe") or existing.get("recipe")
    if license is None:
        license = existing.get("license")
    section = _cellhub_section(model, recipe, metrics, license)

    if kind == "svm":
        model.save_pretrained(d, metrics=_metrics_summary(metrics))
        config = read_json(d / CONFIG_NAME) or {}
        config.setdefault("cellhub", {}).update(section)
    elif kind == "smallcnn":
        model.save_pretrained(d)  # mixin: weights + __init__ args as config.json
        config = read_json(d / CONFIG_NAME) or {}
        labels = list(model.labels)
        config.update(
            architecture=model.pretrained_cfg["architecture"],
            num_classes=len(labels),
            num_features=model.num_features,
            label_names=labels,
            pretrained_cfg=to_jsonable({k: v for k, v in model.pretrained_cfg.items()
                                      if k not in ("architecture", "label_names")}),
            # reconstruction args for timm / transformers (``cellhub_smallcnn`` is registered in timm
            # when cellhub is imported); never num_classes, which transformers passes itself
            model_args=model.model_args(),
            cellhub=section,
        )
    else:
        labels = list(model.cellhub_config["labels"])
        _save_weights(model, d / WEIGHTS_NAME)
        config = _timm_config(model, labels)
        config["cellhub"] = section
    atomic_write_json(d / CONFIG_NAME, config, indent=2)
    build_model_card(d, repo_id=repo_id).save(d / CARD_NAME)
    logger.info("saved %s checkpoint to %s", kind, d)
    return d


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def _strip_prefix(ref: str) -> tuple[str, str | None]:
    for prefix in ("hf-hub:", "local-dir:"):
        if ref.startswith(prefix):
            return ref[len(prefix):], prefix
    return ref, None


def _resolve_folder(ref: str | Path, revision: str | None, token: str | None) -> Path:
    """A local folder, or a Hub repo id resolved through the HF cache (safe files only)."""
    ref_s, prefix = _strip_prefix(str(ref))
    path = Path(ref_s).expanduser()
    if path.is_dir():
        return path
    if prefix == "local-dir:" or path.exists() or ref_s.startswith((".", "/", "~")) or ref_s.count("/") > 1:
        raise FileNotFoundError(f"{ref!s} is not a checkpoint folder (no such directory).")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = snapshot_download(
            ref_s, revision=revision, token=token,
            # pickles are never even downloaded
            allow_patterns=list(SAFE_DOWNLOAD_PATTERNS),
        )
    except HFValidationError as e:
        raise ValueError(f"{ref!s} is neither an existing folder nor a valid Hub repo id "
                         f"('org/name'): {e}") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise HubError(f"Hub repo {ref_s!r} was not found or you may not read it. Check the name; for a "
                       "private or gated repo log in (`hf auth login`) or pass token=.") from e
    except RevisionNotFoundError as e:
        raise HubError(f"Revision {revision!r} does not exist in {ref_s!r}.") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise HubError(f"{ref_s!r} is not in the Hugging Face cache and the Hub cannot be reached "
                       "(offline or HF_HUB_OFFLINE=1). Download it once with network access "
                       "(cellhub.load_pretrained or `hf download ...`), or pass a local folder.") from e
    return Path(local)


def _remote_pickles(folder: Path, source: str) -> list[str]:
    """Pickle files of a Hub repo that were deliberately not downloaded (best effort, online only)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE or Path(_strip_prefix(source)[0]).is_dir() or "snapshots" not in folder.parts:
        return []
    try:
        files = HfApi().list_repo_files(_strip_prefix(source)[0])
    except Exception as e:  # noqa: BLE001 - only used to improve an error message
        logger.debug("could not list %s: %s", source, e)
        return []
    return [f for f in files if Path(f).suffix.lower() in PICKLE_SUFFIXES]


def _refuse_pickles(folder: Path, source: str) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    pickles = pickles or _remote_pickles(folder, source)
    hint = (f" It holds only pickle files ({', '.join(pickles)}), which can run arbitrary code when "
            "loaded. If you trust their origin, convert them once yourself, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')."
            if pickles else "")
    raise UnsafeCheckpointError(f"No safetensors weights in {source}: cellhub loads safetensors only and "
                                f"never unpickles a downloaded file.{hint}")


def _attach_config(model: nn.Module, config: Mapping[str, Any], kind: str) -> nn.Module:
    section = dict(config.get("cellhub") or {})
    labels = (section.get("labels") or config.get("label_names") or config.get("labels")
              or [f"LABEL_{i}" for i in range(int(config.get("num_classes", 0)))])
    pcfg = getattr(model, "pretrained_cfg", None) or config.get("pretrained_cfg") or {}
    section.setdefault("model_name", section.get("model_name") or (
        "smallcnn" if kind == "smallcnn" else config.get("architecture")))
    section.setdefault("architecture", config.get("architecture"))
    section.setdefault("task", None)
    section["labels"] = list(labels)
    section.setdefault("pretrained", False)
    section.setdefault("abstention_threshold", None)
    if pcfg:
        section["pretrained_cfg"] = data_config_from_pretrained_cfg(pcfg)
    model.cellhub_config = section
    return model


def _load_timm(folder: Path, config: Mapping[str, Any], device: str | torch.device) -> nn.Module:
    import timm
    from safetensors.torch import load_file

    arch = config.get("architecture")
    if not arch or not timm.is_model(arch):
        raise ValueError(f"config.json in {folder} names architecture {arch!r}, which timm does not know "
                         f"(timm {timm.__version__}).")
    labels = config.get("label_names") or (config.get("cellhub") or {}).get("labels")
    num_classes = int(config.get("num_classes") or len(labels or []))
    model_args = dict(config.get("model_args") or {})
    model_args.pop("num_classes", None)
    pcfg = dict(config.get("pretrained_cfg") or {})
    pcfg.update(architecture=arch, num_classes=num_classes)
    if labels:
        pcfg["label_names"] = list(labels)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    # keep timm's architecture defaults (first_conv, ...) but take the checkpoint's preprocessing
    model.pretrained_cfg = {**model.pretrained_cfg, **pcfg}
    state = load_file(str(folder / WEIGHTS_NAME), device=str(device))
    if any(k.startswith("timm_model.") for k in state):  # saved by transformers' TimmWrapper
        state = {k.removeprefix("timm_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(
    repo_id_or_directory: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """Load any cellhub checkpoint (timm model, SmallCNN or SVM) from a folder or a Hub repo id.

    Hub ids (``org/name`` or ``hf-hub:org/name``) resolve through the Hugging Face cache, so
    after one download this works with ``HF_HUB_OFFLINE=1``. Only safetensors are read; a
    checkpoint with only pickle weights raises :class:`UnsafeCheckpointError`. The returned model
    is in eval mode and carries ``model.cellhub_config`` (labels, preprocessing, ...).
    """
    folder = _resolve_folder(repo_id_or_directory, revision, token)
    source = str(repo_id_or_directory)
    config = read_json(folder / CONFIG_NAME)
    if config is None:
        if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
            _refuse_pickles(folder, source)
        raise FileNotFoundError(f"No readable config.json in {source}; is it a cellhub/timm checkpoint?")
    section = config.get("cellhub") or {}

    if is_svm_config(config):
        if not (folder / "svm.safetensors").is_file():
            _refuse_pickles(folder, source)
        model = SVMClassifier.from_pretrained(folder, device=device)
        return model.eval()

    if not (folder / WEIGHTS_NAME).is_file():
        _refuse_pickles(folder, source)

    if config.get("architecture") == SMALLCNN_ARCHITECTURE or section.get("model_name") == "smallcnn":
        model = SmallCNN.from_pretrained(folder, map_location=str(device))
        kind = "smallcnn"
    elif config.get("architecture"):
        model = _load_timm(folder, config, device)
        kind = "timm"
    else:
        raise ValueError(f"{source} is not a cellhub checkpoint: config.json has no 'architecture' "
                         f"or 'model_type' (keys: {sorted(config)[:12]}).")
    _attach_config(model, config, kind)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# push
# ----------------------------------------------------------------------------------------------


def _upload_files(folder: Path) -> list[Path]:
    """The top-level files of ``folder`` that :data:`UPLOAD_PATTERNS` admit (huggingface_hub's own
    pattern filter, as ``upload_folder(allow_patterns=...)`` applies it); pickles never are."""
    from huggingface_hub.utils import filter_repo_objects

    top = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = list(filter_repo_objects(top, allow_patterns=list(UPLOAD_PATTERNS), key=lambda p: p.name))
    skipped = [p.name for p in top if p.suffix.lower() in PICKLE_SUFFIXES]
    if skipped:
        logger.warning("Not uploading pickle files %s (safetensors only).", skipped)
    return files


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of the HTTP clients huggingface_hub may use (``httpx2`` from 2.x, ``httpx`` before)."""
    import importlib

    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def push_to_hub(
    model_or_directory: Any,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    *,
    commit_message: str | None = None,
) -> str:
    """Publish a model (or a folder written by :func:`save_pretrained`) to the Hub in one commit.

    Creates the repo if needed, regenerates the model card for ``repo_id`` and uploads weights,
    config, card, metrics and plots together, so a failure leaves nothing half-uploaded.
    Returns the repo URL. Raises :class:`HubError` with what to do when there is no token,
    no network, or no write permission.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {e}. Use 'your-username/model-name'.") from None

    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if isinstance(model_or_directory, (str, Path)):
            folder = Path(model_or_directory)
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is not a folder; save the model first with "
                                        "cellhub.save_pretrained(model, folder).")
            config = read_json(folder / CONFIG_NAME)
            if config is None:
                raise FileNotFoundError(f"No config.json in {folder}; save it with cellhub.save_pretrained.")
            if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
                _refuse_pickles(folder, str(folder))
            build_model_card(folder, repo_id=repo_id).save(folder / CARD_NAME)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="cellhub-push-")
            folder = save_pretrained(_unwrap(model_or_directory), tmp.name, repo_id=repo_id)

        files = _upload_files(folder)
        token = token or get_token()
        if not token:
            raise HubError("No Hugging Face token found. Log in with `hf auth login`, set the HF_TOKEN "
                           "environment variable, or pass token=... (create a token with *write* access "
                           "at https://huggingface.co/settings/tokens).")
        if constants.HF_HUB_OFFLINE:
            raise HubError("HF_HUB_OFFLINE=1 is set, so nothing can be uploaded. Unset it (or set "
                           f"HF_HUB_OFFLINE=0) and retry; the checkpoint is ready in {folder}.")
        api = HfApi(token=token)
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
        message = commit_message or f"Upload {(read_json(folder / CONFIG_NAME) or {}).get('architecture', 'model')} with cellhub"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.create_commit(repo_id, operations=operations, commit_message=message,
                                     repo_type="model")
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status == 401:
                raise HubError(f"The Hub rejected your token (401) for {repo_id!r}: it is invalid or "
                               "expired. Run `hf auth login` again or pass a valid token=.") from e
            if status in (403, 404):
                raise HubError(f"You may not write to {repo_id!r} ({status}). Use a token with write "
                               "access to that namespace (an organisation needs a write role), or push "
                               "to your own username. Nothing was uploaded.") from e
            raise HubError(f"The Hub refused the upload to {repo_id!r}: {e}. Nothing was uploaded; "
                           f"the checkpoint is in {folder}.") from e
        except (OfflineModeIsEnabled, OSError, ConnectionError, TimeoutError, *_transport_errors()) as e:
            raise HubError(f"Could not reach the Hugging Face Hub to push {repo_id!r} ({type(e).__name__}: "
                           f"{e}). Check your network/proxy and retry; nothing was uploaded.") from e
        url = str(getattr(info, "repo_url", "") or f"https://huggingface.co/{repo_id}")
        logger.info("pushed %d files to %s (%s)", len(files), url, getattr(info, "commit_url", ""))
        return url
    finally:
        if tmp is not None:
            tmp.cleanup()
