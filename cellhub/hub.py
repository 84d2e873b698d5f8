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

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "HubError",
    "UnsafeCheckpointError",
    "build_model_card",
    "load_pretrained",
    "push_to_hub",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
SVM_MODEL_TYPE = "cellhub-svm"
#: Files uploaded by :func:`push_to_hub` (top level of the folder only).
UPLOAD_SUFFIXES = (".safetensors", ".json", ".png", ".md")
#: Weight formats that execute code when loaded; never read, never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt", ".h5", ".msgpack", ".npy")
#: Result files written by training into the checkpoint folder.
RESULT_FILES = ("metrics.json", "history.json")
DEFAULT_LICENSE = "mit"
_PLACEHOLDER_REPO = "<your-username>/<model-name>"


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
    from .models import SmallCNN

    cfg = getattr(model, "cellhub_config", None) or {}
    if cfg.get("model_type") == SVM_MODEL_TYPE or type(model).__name__ == "SVMClassifier":
        return "svm"
    if isinstance(model, SmallCNN):
        return "smallcnn"
    if isinstance(getattr(model, "pretrained_cfg", None), Mapping) and hasattr(model, "get_classifier"):
        return "timm"
    raise TypeError(f"Don't know how to save a {type(model).__name__}; expected a model from "
                    "cellhub.create_model, a SmallCNN or an SVMClassifier.")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("Skipping unreadable %s: %s", path, e)
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    tmp.replace(path)


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
    from .models import data_config_from_pretrained_cfg

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
    return _jsonable(config)


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
    return _jsonable(section)


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
        _write_json(d / "metrics.json", metrics)
    else:
        metrics = _read_json(d / "metrics.json")
    if history is not None:
        _write_json(d / "history.json", history)
    for f in extra_files or ():
        src = Path(f)
        if not src.is_file():
            raise FileNotFoundError(f"extra file {src} does not exist")
        if src.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeCheckpointError(f"Refusing to add {src.name}: pickle files are never published.")
        if src.resolve() != (d / src.name).resolve():
            shutil.copy2(src, d / src.name)

    existing = (_read_json(d / CONFIG_NAME) or {}).get("cellhub", {})
    if recipe is None:
        recipe = (getattr(model, "cellhub_config", None) or {}).get("recipe") or existing.get("recipe")
    if license is None:
        license = existing.get("license")
    section = _cellhub_section(model, recipe, metrics, license)

    if kind == "svm":
        model.save_pretrained(d, metrics=_metrics_summary(metrics))
        config = _read_json(d / CONFIG_NAME) or {}
        config.setdefault("cellhub", {}).update(section)
    elif kind == "smallcnn":
        model.save_pretrained(d)  # mixin: weights + __init__ args as config.json
        config = _read_json(d / CONFIG_NAME) or {}
        labels = list(model.labels)
        config.update(
            architecture=model.pretrained_cfg["architecture"],
            num_classes=len(labels),
            num_features=model.num_features,
            label_names=labels,
            pretrained_cfg=_jsonable({k: v for k, v in model.pretrained_cfg.items()
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
    _write_json(d / CONFIG_NAME, config)
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
            allow_patterns=["*.json", "*.safetensors", CARD_NAME, "*.png"],
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
    from .models import data_config_from_pretrained_cfg

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
    config = _read_json(folder / CONFIG_NAME)
    if config is None:
        if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
            _refuse_pickles(folder, source)
        raise FileNotFoundError(f"No readable config.json in {source}; is it a cellhub/timm checkpoint?")
    section = config.get("cellhub") or {}

    if config.get("model_type") == SVM_MODEL_TYPE or section.get("model_type") == SVM_MODEL_TYPE:
        if not (folder / "svm.safetensors").is_file():
            _refuse_pickles(folder, source)
        from .svm import SVMClassifier

        model = SVMClassifier.from_pretrained(folder, device=device)
        return model.eval()

    if not (folder / WEIGHTS_NAME).is_file():
        _refuse_pickles(folder, source)

    from .models import SMALLCNN_ARCHITECTURE, SmallCNN

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
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in UPLOAD_SUFFIXES and not p.name.startswith("."))
    skipped = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES]
    if skipped:
        logger.warning("Not uploading pickle files %s (safetensors only).", skipped)
    return files


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
            config = _read_json(folder / CONFIG_NAME)
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
        message = commit_message or f"Upload {(_read_json(folder / CONFIG_NAME) or {}).get('architecture', 'model')} with cellhub"
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
        except (OfflineModeIsEnabled, OSError, ConnectionError, TimeoutError) as e:
            raise HubError(f"Could not reach the Hugging Face Hub to push {repo_id!r} ({type(e).__name__}: "
                           f"{e}). Check your network/proxy and retry; nothing was uploaded.") from e
        except Exception as e:  # httpx transport errors do not share a base with the above
            if type(e).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3"):
                raise HubError(f"Could not reach the Hugging Face Hub to push {repo_id!r} "
                               f"({type(e).__name__}: {e}). Check your network and retry; nothing was "
                               "uploaded.") from e
            raise
        url = str(getattr(info, "repo_url", "") or f"https://huggingface.co/{repo_id}")
        logger.info("pushed %d files to %s (%s)", len(files), url, getattr(info, "commit_url", ""))
        return url
    finally:
        if tmp is not None:
            tmp.cleanup()


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_ci(ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]"
    return "n/a"


def _split_info(metrics: Mapping[str, Any] | None) -> tuple[str, str]:
    """(short split name for model-index, human description)."""
    split = (metrics or {}).get("split")
    if isinstance(split, Mapping):
        name = str(split.get("name") or split.get("split") or "test")
        desc = str(split.get("description") or "; ".join(f"{k}: {v}" for k, v in split.items()))
        return name, desc
    if split:
        return str(split).split()[0].rstrip(":,;"), str(split)
    return "test", "not recorded"


def _card_kind(config: Mapping[str, Any]) -> str:
    from .models import SMALLCNN_ARCHITECTURE

    section = config.get("cellhub") or {}
    if config.get("model_type") == SVM_MODEL_TYPE or section.get("model_type") == SVM_MODEL_TYPE:
        return "svm"
    if config.get("architecture") == SMALLCNN_ARCHITECTURE or section.get("model_name") == "smallcnn":
        return "smallcnn"
    return "timm"


_SPLIT_WHY = {
    "blood-cells": (
        "The Kaggle TRAIN crops are ~35 augmented copies (rotations, flips, shifts) of only ~276 "
        "distinct white cells, so a random image-level split puts copies of the same cell on both "
        "sides and reports near-100% accuracy that means nothing. Validation is therefore grouped by "
        "**source cell**: each crop is matched to the smear it was cut from, and smears showing the "
        "same microscope field are one group (one cell can appear in two consecutive frames), so no "
        "cell contributes to both sides."
    ),
    "malaria": (
        "Cells from one patient/slide are highly correlated (same stain, same parasite strain), so "
        "the data are split by **patient/slide** (file-name prefix `C<slide>P<patient>`): no "
        "patient contributes to both training and evaluation."
    ),
}


def build_model_card(directory: str | Path, repo_id: str | None = None) -> Any:
    """Build the ``README.md`` model card for a saved checkpoint folder.

    Reads ``config.json`` and, when present, ``metrics.json``, ``history.json`` and the plots
    (``curves.png``, ``confusion_matrix.png``) that training wrote into the folder.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .tasks import TASKS

    d = Path(directory)
    config = _read_json(d / CONFIG_NAME)
    if config is None:
        raise FileNotFoundError(f"No config.json in {d}; save the model first.")
    section = config.get("cellhub") or {}
    kind = _card_kind(config)
    labels = list(section.get("labels") or config.get("label_names") or config.get("labels") or [])
    task_name = section.get("task")
    task = TASKS.get(task_name) if task_name else None
    metrics = _read_json(d / "metrics.json") or section.get("metrics") or {}
    history = _read_json(d / "history.json")
    recipe = section.get("recipe") or {}
    model_name = section.get("model_name") or config.get("architecture") or kind
    backbone = section.get("backbone")
    pcfg = section.get("pretrained_cfg") or config.get("pretrained_cfg") or {}
    repo = repo_id or section.get("repo_id") or _PLACEHOLDER_REPO
    title = repo.split("/")[-1] if repo_id else f"cellhub {model_name}" + (f" — {task_name}" if task_name else "")
    base_model = section.get("base_model") if section.get("pretrained") else None

    dataset_id = recipe.get("dataset") if isinstance(recipe.get("dataset"), str) else None
    hub_dataset = task.hub_dataset if task else None
    if dataset_id and "/" in dataset_id and not Path(dataset_id).exists() and dataset_id.count("/") == 1:
        hub_dataset = dataset_id
    split_name, split_desc = _split_info(metrics)

    eval_results = []
    if metrics:
        ds_type = hub_dataset or (task_name or "custom")
        ds_name = (task.description.split(" (")[0] if task else None) or ds_type
        for key, mtype, mname, mcfg in (("accuracy", "accuracy", "Accuracy", None),
                                        ("macro_f1", "f1", "Macro F1", "macro"),
                                        ("auc", "roc_auc", "ROC AUC", None)):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                eval_results.append(EvalResult(
                    task_type="image-classification", task_name="Image Classification",
                    dataset_type=ds_type, dataset_name=ds_name, dataset_split=split_name,
                    metric_type=mtype, metric_name=mname, metric_value=round(float(value), 4),
                    metric_config=mcfg,
                ))

    tags = ["image-classification", "cellhub", "microscopy", "blood-smear", "medical-imaging"]
    if task_name:
        tags.append(task_name)
    tags.append(model_name if kind != "svm" else "svm")
    if kind == "timm":
        tags.append("timm")
    card_data = ModelCardData(
        license=section.get("license") or DEFAULT_LICENSE,
        library_name="timm" if kind == "timm" else "cellhub",
        pipeline_tag="image-classification",
        tags=tags,
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=base_model,
        model_name=repo.split("/")[-1] if repo_id else f"cellhub-{model_name}-{task_name or 'custom'}",
        eval_results=eval_results or None,
    )

    lines: list[str] = [f"# {title}", ""]
    what = {
        "timm": f"a timm **{model_name}**" + (f" fine-tuned from `{base_model}` (ImageNet)" if base_model
                                               else " trained from scratch"),
        "smallcnn": "the cellhub **small CNN** (conv-BatchNorm-ReLU stages, global average pooling, "
                    "one linear layer) trained from scratch",
        "svm": f"an **SVM** (RBF kernel, Platt-scaled probabilities) on features of a cellhub "
               f"`{backbone}` backbone",
    }[kind]
    task_part = (f" for the `{task.name}` task: {task.description.rstrip('.')}" if task else "")
    lines += [
        f"This is {what}{task_part}.", "",
        f"It classifies one single-cell crop into {len(labels)} classes: "
        + ", ".join(f"`{x}`" for x in labels) + ".",
        "",
        "Made with **cellhub**, open-source blood-smear cell classification (MIT licence).",
        "",
        "## Intended use",
        "",
        "- **For** research and education: exploring how CNNs classify blood-smear cells, teaching, "
        "benchmarking, and as a starting point for models trained on your own lab's images.",
        "- **Not for** diagnosis or any clinical decision. This is **not a medical device**; it has not "
        "been validated on patients, other stains, microscopes or scanners. Predictions on images unlike "
        "the training data (other magnification, whole smears instead of single-cell crops, other cell "
        "types) are meaningless, and the model cannot tell you so reliably.",
        "",
        "## Inputs and labels",
        "",
        f"- Input: one RGB single-cell crop, resized (short side) and center-cropped to "
        f"{'x'.join(str(v) for v in pcfg.get('input_size', [])[1:]) or 'n/a'} px "
        f"({pcfg.get('interpolation', 'bilinear')}), normalised with mean "
        f"{pcfg.get('mean', 'n/a')} and std {pcfg.get('std', 'n/a')}. All of this is stored in "
        "`config.json` and applied by timm, transformers and cellhub automatically.",
        "- Labels (index order): " + ", ".join(f"{i}: `{x}`" for i, x in enumerate(labels)),
        "",
    ]

    thr = section.get("abstention") or section.get("abstention_threshold")
    if isinstance(thr, Mapping):
        thr_value = thr.get("threshold")
    else:
        thr_value = thr
    if thr_value is not None:
        lines += ["## Abstention", "",
                  f"Predictions whose top probability is below **{_fmt(float(thr_value))}** should be "
                  "treated as *uncertain - refer for manual review*. cellhub's `Predictor` flags them "
                  "(`abstain=True`)."]
        if isinstance(thr, Mapping):
            if thr.get("rule"):
                lines.append(f"Rule: {thr['rule']}.")
            if thr.get("coverage") is not None:
                lines.append(f"On validation data it kept {_fmt(100 * thr['coverage'], 1)}% of the "
                             f"images, at {_fmt(100 * thr.get('selective_accuracy', 0), 1)}% accuracy.")
        lines.append("")

    lines += ["## Training data and split", ""]
    if task is not None:
        lines.append(f"Task `{task.name}`: {task.description}" + (f" Hub dataset: `{hub_dataset}`." if hub_dataset else ""))
        lines.append("")
        if task.name in _SPLIT_WHY:
            lines += [_SPLIT_WHY[task.name], ""]
    elif dataset_id:
        lines += [f"Dataset: `{dataset_id}`.", ""]
    lines.append(f"Evaluation split: {split_desc}.")
    if metrics.get("n_images") is not None:
        unit = task.group_unit if task else "group"
        lines.append(f"It holds {metrics['n_images']} images from {metrics.get('n_groups', 'n/a')} "
                     f"independent groups ({unit}); the confidence intervals resample groups, not images.")
    lines.append("")

    if recipe:
        shown = dict(recipe)
        # what the model really is (a CLI default such as pretrained=True means nothing for smallcnn)
        if "pretrained" in shown and kind != "svm":
            shown["pretrained"] = bool(section.get("pretrained"))
        notes = shown.pop("notes", None)
        lines += ["## Training recipe", "", "| setting | value |", "|---|---|"]
        for k, v in shown.items():
            if v is None or v == [] or v == {}:
                continue
            if isinstance(v, str) and (Path(v).is_absolute() or v.startswith(("~", "./", "../"))):
                v = f"local folder {Path(v).name}"  # no machine-local paths in a public card
            lines.append(f"| {k} | `{json.dumps(v) if not isinstance(v, str) else v}` |")
        lines.append("")
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in (notes if isinstance(notes, list) else [notes])] + [""]

    lines += ["## Evaluation", ""]
    if metrics:
        lines += [f"Measured on the **{split_name}** split ({metrics.get('n_images', '?')} images, "
                  f"{metrics.get('n_groups', '?')} groups). 95% CI: {metrics.get('ci_method', 'grouped bootstrap')}.",
                  "", "| metric | value | 95% CI |", "|---|---|---|",
                  f"| accuracy | {_fmt(metrics.get('accuracy'))} | {_fmt_ci(metrics.get('ci95'))} |",
                  f"| macro F1 | {_fmt(metrics.get('macro_f1'))} | {_fmt_ci(metrics.get('macro_f1_ci95'))} |"]
        if "balanced_accuracy" in metrics:
            lines.append(f"| balanced accuracy | {_fmt(metrics['balanced_accuracy'])} | |")
        if "auc" in metrics:
            lines.append(f"| ROC AUC | {_fmt(metrics['auc'])} | |")
        if "ece" in metrics:
            lines.append(f"| calibration error (ECE) | {_fmt(metrics['ece'])} | |")
        lines.append("")
        splits = metrics.get("splits")
        if isinstance(splits, Mapping) and len(splits) > 1:
            lines += ["All splits (the train row shows how much the model memorised):", "",
                      "| split | images | groups | accuracy | 95% CI | macro F1 | 95% CI |",
                      "|---|---|---|---|---|---|---|"]
            for sname, sm in splits.items():
                if isinstance(sm, Mapping):
                    lines.append(f"| {sname} | {sm.get('n_images', '')} | {sm.get('n_groups', '')} | "
                                 f"{_fmt(sm.get('accuracy'))} | {_fmt_ci(sm.get('ci95'))} | "
                                 f"{_fmt(sm.get('macro_f1'))} | {_fmt_ci(sm.get('macro_f1_ci95'))} |")
            lines.append("")
        per_class = metrics.get("per_class") or {}
        if per_class:
            lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            for name, pc in per_class.items():
                lines.append(f"| {name} | {_fmt(pc.get('precision'))} | {_fmt(pc.get('recall'))} | "
                             f"{_fmt(pc.get('f1'))} | {pc.get('support', '')} |")
            lines.append("")
        cm = metrics.get("confusion_matrix")
        cm_labels = metrics.get("labels") or labels
        if cm and len(cm) == len(cm_labels):
            lines += ["Confusion matrix (rows = true, columns = predicted):", "",
                      "| true \\ predicted | " + " | ".join(cm_labels) + " |",
                      "|---" * (len(cm_labels) + 1) + "|"]
            for name, row in zip(cm_labels, cm):
                lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
            lines.append("")
    else:
        lines += ["No evaluation results were saved with this checkpoint.", ""]
    if (d / "curves.png").is_file():
        lines += ["![Training curves](curves.png)", ""]
    elif history:
        lines += [f"Training history ({len(history)} epochs) is in `history.json`.", ""]
    if (d / "confusion_matrix.png").is_file():
        lines += ["![Confusion matrix](confusion_matrix.png)", ""]
    for png in sorted(d.glob("*.png")):
        if png.name not in ("curves.png", "confusion_matrix.png"):
            lines += [f"![{png.stem.replace('_', ' ')}]({png.name})", ""]

    lines += ["## How to use", ""]
    if kind == "timm":
        lines += [
            "With **timm**:", "", "```python", "import timm, torch", "from PIL import Image", "",
            f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
            "cfg = timm.data.resolve_data_config(model=model)",
            "transform = timm.data.create_transform(**cfg)",
            'x = transform(Image.open("cell.png").convert("RGB")).unsqueeze(0)',
            "probs = model(x).softmax(-1)[0]",
            'print({name: float(p) for name, p in zip(model.pretrained_cfg["label_names"], probs)})',
            "```", "",
            "With **transformers**:", "", "```python", "from transformers import pipeline", "",
            f'classifier = pipeline("image-classification", model="{repo}")',
            'print(classifier("cell.png"))',
            "```", "",
        ]
    elif kind == "smallcnn":
        lines += [
            "With the **Hub mixin** (plain PyTorch):", "", "```python",
            "from cellhub import SmallCNN", "",
            f'model = SmallCNN.from_pretrained("{repo}")  # strict, safetensors only',
            "```", "",
            "With **timm** or **transformers**: importing cellhub registers the architecture "
            "(`cellhub_smallcnn`) in timm, after which the usual calls work:", "", "```python",
            "import cellhub, timm",
            "from transformers import pipeline", "",
            f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
            f'classifier = pipeline("image-classification", model="{repo}")',
            "```", "",
        ]
    lines += [
        "With **cellhub** (preprocessing, Grad-CAM and abstention included):", "", "```python",
        "import cellhub", "",
        f'model = cellhub.load_pretrained("{repo}")',
        "predictor = cellhub.Predictor(model)",
        'result = predictor.predict(["cell.png"])[0]',
        "print(result.label, result.confidence, result.abstain)",
        "```", "",
        f'or from the shell: `python -m cellhub predict {repo} cell.png`', "",
        "## Limitations", "",
        "- Trained on a single public dataset; accuracy on other labs' stains and optics is unknown and "
        "likely lower. Validate on your own data before relying on it.",
        "- The evaluation set is small in independent units (groups); read the confidence intervals, not "
        "the point estimate.",
        "- Class balance in the training data may not match your population; calibration may drift.",
        "",
    ]
    body = "\n".join(lines)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
