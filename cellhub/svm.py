"""CNN features + one-vs-one SVM baseline, saved without pickle.

The study this project grew from reported ResNet50 features + SVM at 83.71% on blood cells.
Here the feature extractor is any registered backbone (global-average-pooled last feature map),
features are cached on disk, and the classifier is scikit-learn's ``SVC`` (one-vs-one, Platt
probabilities). It is saved as safetensors (support vectors, dual coefficients, intercepts,
Platt ``probA``/``probB``, scaler) + ``config.json`` and rebuilt by a small numpy predictor that
reproduces libsvm's decisions and probabilities, so loading needs neither pickle nor the same
scikit-learn version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import models, transforms
from .cache import atomic_path, json_default, update_with_files

__all__ = ["SVMClassifier", "extract_features", "pool_features", "SVM_MODEL_TYPE", "SAFE_DOWNLOAD_PATTERNS",
           "is_svm_config"]

logger = logging.getLogger(__name__)

SVM_MODEL_TYPE = "cellhub-svm"
#: what a checkpoint download may fetch (pickled weights are never downloaded, let alone loaded)
SAFE_DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "README.md", "*.png")
_SVM_FILE = "svm.safetensors"
_BACKBONE_FILE = "backbone.safetensors"
_MIN_PROB = 1e-7  # libsvm clips pairwise probabilities to [min_prob, 1 - min_prob]


def is_svm_config(config: dict[str, Any] | None) -> bool:
    """Whether a ``config.json`` (or a ``cellhub_config``) describes a :class:`SVMClassifier`."""
    config = config or {}
    return config.get("model_type") == SVM_MODEL_TYPE or (config.get("cellhub") or {}).get("model_type") == SVM_MODEL_TYPE


# --------------------------------------------------------------------------- features
def pool_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled last feature map: (B, 3, H, W) -> (B, C)."""
    f = backbone.forward_features(x)
    if f.ndim == 4:
        f = f.mean(dim=(2, 3))
    elif f.ndim == 3:  # token sequences (B, N, C)
        f = f.mean(dim=1)
    return f.float()


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Any,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Pooled backbone features for every image of a cellhub split, cached on disk.

    ``dataset`` is a split from :func:`cellhub.data.load_cell_dataset` (``image`` column), or one
    from :func:`cellhub.data.cache_resized` (``pixels`` column, used when present so JPEGs are
    not decoded again). Preprocessing is the backbone's own (``cellhub.transforms``). The cache
    key covers the backbone weights, the preprocessing and the dataset fingerprint, so a changed
    model or dataset never reuses stale features. Returns float32 (n_images, n_features).
    """
    from tqdm.auto import tqdm

    cfg = transforms.resolve_data_config(backbone)
    tf = transforms.eval_transform(cfg)
    cache_file = None
    if cache_dir is not None:
        fp = _dataset_identity(dataset)
        if fp is None:
            logger.info("Dataset has no fingerprint; features will not be cached.")
        else:
            key = hashlib.sha256(
                json.dumps([_weights_digest(backbone), fp, cfg], sort_keys=True, default=str).encode()
            ).hexdigest()[:24]
            cache_file = Path(cache_dir) / f"features-{key}.safetensors"
            if cache_file.is_file():
                from safetensors.numpy import load_file

                try:
                    feats = load_file(str(cache_file))["features"]
                    if len(feats) == len(dataset):
                        logger.info("Loaded cached features %s", cache_file)
                        return feats
                except Exception as exc:  # a torn or foreign file: recompute
                    logger.warning("Ignoring unreadable feature cache %s (%s)", cache_file, exc)

    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    column = "pixels" if "pixels" in getattr(dataset, "column_names", []) else "image"
    out = []
    n = len(dataset)
    bar = tqdm(total=n, desc="features", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        rows = dataset[start : start + batch_size][column]
        batch = torch.stack([tf(_to_input(r)) for r in rows]).to(device)
        out.append(pool_features(backbone, batch).cpu().numpy())
        bar.update(len(rows))
    bar.close()
    backbone.train(was_training)
    feats = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
    if cache_file is not None:
        from safetensors.numpy import save_file

        with atomic_path(cache_file) as tmp:
            save_file({"features": feats}, str(tmp))
    return feats


def _dataset_identity(ds: Any) -> str | None:
    """What the rows are: backing Arrow files (+ their size/content digest) and the row selection.

    ``datasets`` fingerprints can differ between two loads of the same files, which would
    defeat the cache; the backing files of a ``cache_resized`` split do not.
    """
    files = getattr(ds, "cache_files", None)
    if not files:
        return getattr(ds, "_fingerprint", None)
    try:
        h = update_with_files(hashlib.sha256(), [f.get("filename", "") for f in files])
    except OSError:
        return getattr(ds, "_fingerprint", None)
    indices = getattr(ds, "_indices", None)
    if indices is not None:
        h.update(np.asarray(indices.column(0).to_numpy(), dtype=np.int64).tobytes())
    h.update(str(len(ds)).encode())
    return h.hexdigest()


def _to_input(x: Any) -> Any:
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    return np.asarray(x, dtype=np.uint8)


# --------------------------------------------------------------------------- libsvm maths
def _kernel(X: np.ndarray, sv: np.ndarray, kernel: str, gamma: float, coef0: float, degree: int) -> np.ndarray:
    if kernel == "linear":
        return X @ sv.T
    if kernel == "rbf":
        d = (X * X).sum(1)[:, None] + (sv * sv).sum(1)[None, :] - 2.0 * (X @ sv.T)
        return np.exp(-gamma * np.maximum(d, 0.0))
    if kernel == "poly":
        return (gamma * (X @ sv.T) + coef0) ** degree
    if kernel == "sigmoid":
        return np.tanh(gamma * (X @ sv.T) + coef0)
    raise ValueError(f"Unsupported SVM kernel {kernel!r}; use one of linear, rbf, poly, sigmoid.")


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def _sigmoid_predict(dec: np.ndarray, a: float, b: float) -> np.ndarray:
    f = dec * a + b
    out = np.empty_like(f)
    pos = f >= 0
    out[pos] = np.exp(-f[pos]) / (1.0 + np.exp(-f[pos]))
    out[~pos] = 1.0 / (1.0 + np.exp(f[~pos]))
    return out


def _multiclass_probability(r: np.ndarray) -> np.ndarray:
    """libsvm's pairwise coupling (Wu, Lin & Weng 2004, method 2), vectorised over samples.

    ``r``: (n, k, k) with r[:, i, j] = P(i | i or j). Returns (n, k).
    """
    n, k, _ = r.shape
    Q = np.empty((n, k, k))
    for t in range(k):
        Q[:, t, t] = (r[:, :, t] ** 2).sum(1) - r[:, t, t] ** 2
        for j in range(k):
            if j != t:
                Q[:, t, j] = -r[:, j, t] * r[:, t, j]
    p = np.full((n, k), 1.0 / k)
    eps = 0.005 / k
    active = np.ones(n, dtype=bool)
    for _ in range(max(100, k)):
        idx = np.nonzero(active)[0]
        if len(idx) == 0:
            break
        Qa, pa = Q[idx], p[idx]
        Qp = np.einsum("ntj,nj->nt", Qa, pa)
        pQp = (pa * Qp).sum(1)
        done = np.abs(Qp - pQp[:, None]).max(1) < eps
        active[idx[done]] = False
        idx = idx[~done]
        if len(idx) == 0:
            break
        Qa, pa, Qp, pQp = Qa[~done], pa[~done], Qp[~done], pQp[~done]
        for t in range(k):
            qtt = Qa[:, t, t]
            diff = (-Qp[:, t] + pQp) / qtt
            pa[:, t] += diff
            pQp = (pQp + diff * (diff * qtt + 2 * Qp[:, t])) / (1 + diff) / (1 + diff)
            Qp = (Qp + diff[:, None] * Qa[:, t, :]) / (1 + diff)[:, None]
            pa = pa / (1 + diff)[:, None]
        p[idx] = pa
    return p


# --------------------------------------------------------------------------- the classifier
class SVMClassifier(nn.Module):
    """Backbone features -> standard scaler -> one-vs-one SVC, as one predictor.

    It is an ``nn.Module`` whose ``forward(x)`` returns log-probabilities (B, K), so evaluation and
    prediction code can treat it like any cellhub model (softmax of the output = probabilities).
    The SVM part runs in numpy on float64 and reproduces scikit-learn's ``decision_function``,
    ``predict`` (one-vs-one voting) and ``predict_proba`` (Platt + pairwise coupling).

    Args:
        labels: class names, in index order (a task's labels).
        backbone: feature extractor with ``forward_features`` (a cellhub model); may be None
            when only the numpy feature API is used.
        backbone_name: registry name recorded in ``config.json``.
        C, kernel, gamma: SVC hyper-parameters (``gamma`` may be "scale").
        task: task name recorded in the config.
    """

    def __init__(
        self,
        labels: Sequence[str],
        backbone: nn.Module | None = None,
        backbone_name: str | None = None,
        C: float = 1.0,
        kernel: str = "rbf",
        gamma: float | str = "scale",
        task: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.labels = [str(x) for x in labels]
        if len(self.labels) < 2:
            raise ValueError(f"An SVM needs at least two labels, got {self.labels!r}.")
        self.backbone = backbone
        self.backbone_name = backbone_name or (
            getattr(backbone, "cellhub_config", {}).get("model_name") if backbone is not None else None
        )
        self.C, self.kernel, self.gamma, self.seed = float(C), kernel, gamma, int(seed)
        self.task = task
        self._params: dict[str, np.ndarray] | None = None
        bcfg = dict(getattr(backbone, "cellhub_config", {}) or {})
        self.cellhub_config: dict[str, Any] = {
            "model_name": "svm",
            "model_type": SVM_MODEL_TYPE,
            "backbone": self.backbone_name,
            "task": task or bcfg.get("task"),
            "labels": self.labels,
            "pretrained": bool(bcfg.get("pretrained", False)),
            "pretrained_cfg": bcfg.get("pretrained_cfg"),
            "abstention_threshold": None,
        }

    # ---- fitting (scikit-learn) -------------------------------------------------------
    def fit(self, features: np.ndarray, y: Sequence[int]) -> "SVMClassifier":
        """Fit the scaler and a one-vs-one ``SVC(probability=True)`` on (n, d) features."""
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        X = np.asarray(features, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"features must be (n_images, n_features) matching y; got {X.shape} and {y.shape}.")
        present = sorted(set(y.tolist()))
        if len(present) < 2:
            raise ValueError(f"Training data has only the classes {present}; an SVM needs at least two.")
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X)
        # SVC(probability=True) is deprecated from scikit-learn 1.9 (removal planned for 1.11); it is
        # the libsvm Platt model (probA/probB + pairwise coupling) the study used, so keep it while
        # it exists. The saved model never needs scikit-learn again.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                svc = SVC(C=self.C, kernel=self.kernel, gamma=self.gamma, decision_function_shape="ovo",
                          probability=True, random_state=self.seed)
            except TypeError as exc:  # pragma: no cover - depends on the installed scikit-learn
                raise RuntimeError(
                    "This scikit-learn no longer offers SVC(probability=True); install "
                    "'scikit-learn>=1.6,<1.11' to train the SVM baseline."
                ) from exc
            svc.fit(Xs, y)
            self._params = self._export(svc, scaler)
        return self

    def _export(self, svc: Any, scaler: Any) -> dict[str, np.ndarray]:
        """Everything the numpy predictor needs, in libsvm's own sign convention."""
        classes = svc.classes_.astype(np.int64)
        k = len(classes)
        dual = np.asarray(svc.dual_coef_, dtype=np.float64)
        intercept = np.asarray(svc.intercept_, dtype=np.float64)
        if k == 2:  # scikit-learn flips binary coefficients; store libsvm's convention
            dual, intercept = -dual, -intercept
        return {
            "classes": classes,
            "support_vectors": np.asarray(svc.support_vectors_, dtype=np.float64),
            "n_support": np.asarray(svc.n_support_, dtype=np.int64),
            "dual_coef": dual,
            "intercept": intercept,
            "probA": np.asarray(svc.probA_, dtype=np.float64),
            "probB": np.asarray(svc.probB_, dtype=np.float64),
            "scaler_mean": np.asarray(scaler.mean_, dtype=np.float64),
            "scaler_scale": np.asarray(scaler.scale_, dtype=np.float64),
            "gamma": np.asarray([float(svc._gamma)], dtype=np.float64),
            "coef0": np.asarray([float(svc.coef0)], dtype=np.float64),
            "degree": np.asarray([int(svc.degree)], dtype=np.int64),
        }

    @property
    def n_support_vectors(self) -> int:
        """Support vectors of the fitted SVC (all classes)."""
        return int(self._require()["n_support"].sum())

    @property
    def is_fitted(self) -> bool:
        return self._params is not None

    def _require(self) -> dict[str, np.ndarray]:
        if self._params is None:
            raise RuntimeError("This SVMClassifier is not fitted; call fit() or from_pretrained() first.")
        return self._params

    # ---- prediction (numpy) -----------------------------------------------------------
    def _raw_decision(self, features: np.ndarray) -> np.ndarray:
        """libsvm decision values, one column per class pair (i, j), positive = class i."""
        P = self._require()
        X = (np.asarray(features, dtype=np.float64) - P["scaler_mean"]) / P["scaler_scale"]
        K = _kernel(X, P["support_vectors"], self.kernel, float(P["gamma"][0]), float(P["coef0"][0]),
                    int(P["degree"][0]))
        ns = P["n_support"]
        start = np.r_[0, np.cumsum(ns)]
        dual, b = P["dual_coef"], P["intercept"]
        k = len(ns)
        cols = []
        for p, (i, j) in enumerate(_pairs(k)):
            si, sj = slice(start[i], start[i + 1]), slice(start[j], start[j + 1])
            cols.append(K[:, si] @ dual[j - 1, si] + K[:, sj] @ dual[i, sj] + b[p])
        return np.stack(cols, 1)

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Same values as scikit-learn's ``SVC(decision_function_shape="ovo").decision_function``."""
        dec = self._raw_decision(features)
        return -dec[:, 0] if dec.shape[1] == 1 else dec

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Class indices by one-vs-one voting (scikit-learn's ``predict``)."""
        P = self._require()
        dec = self._raw_decision(features)
        k = len(P["classes"])
        votes = np.zeros((len(dec), k), dtype=np.int64)
        for p, (i, j) in enumerate(_pairs(k)):
            win_i = dec[:, p] > 0
            votes[:, i] += win_i
            votes[:, j] += ~win_i
        return P["classes"][votes.argmax(1)]

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        """(n, n_labels) probabilities, same as scikit-learn's ``predict_proba``.

        Columns follow ``self.labels``; a label absent from the training data gets probability 0.
        """
        P = self._require()
        dec = self._raw_decision(features)
        classes = P["classes"]
        k = len(classes)
        n = len(dec)
        r = np.zeros((n, k, k))
        for p, (i, j) in enumerate(_pairs(k)):
            pij = np.clip(_sigmoid_predict(dec[:, p], P["probA"][p], P["probB"][p]), _MIN_PROB, 1 - _MIN_PROB)
            r[:, i, j] = pij
            r[:, j, i] = 1 - pij
        # scikit-learn's vendored libsvm couples pairwise probabilities for two classes as well
        probs = _multiclass_probability(r)
        out = np.zeros((n, len(self.labels)))
        out[:, classes] = probs
        return out

    # ---- images ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> log-probabilities (B, K)."""
        if self.backbone is None:
            raise RuntimeError("This SVMClassifier has no backbone; pass features to predict_proba_features().")
        with torch.no_grad():
            feats = pool_features(self.backbone, x).cpu().numpy()
        probs = self.predict_proba_features(feats)
        return torch.from_numpy(np.log(np.clip(probs, 1e-12, None))).to(device=x.device, dtype=torch.float32)

    def predict_proba(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Probabilities from preprocessed image tensors (B,3,H,W) or from (n, d) features."""
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            return torch.softmax(self.forward(x), dim=1).cpu().numpy().astype(np.float64)
        return self.predict_proba_features(np.asarray(x))

    def predict(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class indices from image tensors (B,3,H,W) or from (n, d) features."""
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            with torch.no_grad():
                x = pool_features(self.backbone, x).cpu().numpy()
        return self.predict_features(np.asarray(x))

    def train(self, mode: bool = True) -> "SVMClassifier":
        # the backbone is a frozen feature extractor: always keep BatchNorm/dropout in eval mode
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    # ---- persistence -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The ``config.json`` content (no arrays)."""
        cfg = {
            "model_type": SVM_MODEL_TYPE,
            "architecture": "cellhub-svm",
            "backbone": self.backbone_name,
            "task": self.cellhub_config.get("task"),
            "labels": self.labels,
            "num_classes": len(self.labels),
            "id2label": {str(i): n for i, n in enumerate(self.labels)},
            "label2id": {n: i for i, n in enumerate(self.labels)},
            "svm": {"C": self.C, "kernel": self.kernel, "gamma": self.gamma, "decision_function_shape": "ovo",
                    "probability": True, "seed": self.seed},
            "pretrained_cfg": self.cellhub_config.get("pretrained_cfg"),
            "backbone_labels": list((getattr(self.backbone, "cellhub_config", None) or {}).get("labels")
                                    or self.labels),
            "cellhub": dict(self.cellhub_config),
        }
        return json.loads(json.dumps(cfg, default=json_default))

    def save_pretrained(self, directory: str | Path, metrics: dict | None = None) -> Path:
        """Write ``svm.safetensors``, ``backbone.safetensors`` (if any) and ``config.json``."""
        from safetensors.numpy import save_file as save_np
        from safetensors.torch import save_file as save_torch

        P = self._require()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_np({k: np.ascontiguousarray(v) for k, v in P.items()}, str(d / _SVM_FILE),
                metadata={"format": SVM_MODEL_TYPE})
        if self.backbone is not None:
            sd = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
            save_torch(sd, str(d / _BACKBONE_FILE), metadata={"format": "pt"})
        cfg = self.config()
        if metrics is not None:
            cfg["cellhub"]["metrics"] = metrics
        (d / "config.json").write_text(json.dumps(cfg, indent=2, default=json_default))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "SVMClassifier":
        """Rebuild a saved SVM (and its backbone) from a local folder or a Hub repo id."""
        from safetensors.numpy import load_file as load_np

        d = Path(directory)
        if not d.is_dir():
            from huggingface_hub import snapshot_download

            # safe files only: pickles in a Hub repo are never even downloaded
            d = Path(snapshot_download(str(directory), allow_patterns=list(SAFE_DOWNLOAD_PATTERNS)))
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"No config.json in {d}; is this a cellhub SVM checkpoint?")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("model_type") != SVM_MODEL_TYPE:
            raise ValueError(
                f"{d} holds model_type {cfg.get('model_type')!r}, not {SVM_MODEL_TYPE!r}; "
                "load it with cellhub.load_pretrained instead."
            )
        svm_cfg = cfg.get("svm", {})
        backbone = None
        if (d / _BACKBONE_FILE).is_file():
            from safetensors.torch import load_file as load_torch

            bcfg = cfg.get("cellhub", {})
            pcfg = cfg.get("pretrained_cfg") or {}
            size = (pcfg.get("input_size") or [None, None, None])[-1]
            backbone = models.create_model(cfg["backbone"], list(cfg.get("backbone_labels") or cfg["labels"]),
                                           pretrained=False, image_size=size)
            backbone.load_state_dict(load_torch(str(d / _BACKBONE_FILE)), strict=True)
            backbone.cellhub_config.update({k: bcfg[k] for k in ("pretrained", "pretrained_cfg") if k in bcfg})
            backbone.to(device).eval()
        obj = cls(cfg["labels"], backbone=backbone, backbone_name=cfg.get("backbone"),
                  C=svm_cfg.get("C", 1.0), kernel=svm_cfg.get("kernel", "rbf"),
                  gamma=svm_cfg.get("gamma", "scale"), task=cfg.get("task"), seed=svm_cfg.get("seed", 0))
        obj.cellhub_config.update(cfg.get("cellhub", {}))
        obj._params = {k: np.asarray(v) for k, v in load_np(str(d / _SVM_FILE)).items()}
        return obj.eval()
