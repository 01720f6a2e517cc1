"""A scikit-learn estimator over the library: :class:`VectorQuantizer` (fit, predict, transform, partial_fit).

Optional: it needs scikit-learn (the ``sklearn`` extra), and ``import vq_pipeline`` never imports it.

    from vq_pipeline.sklearn import VectorQuantizer
    vq = VectorQuantizer(n_codes=256, metric="cosine", random_state=0).fit(x)
    codes = vq.predict(x_new)                       # int64 (n_rows,)
    vq.to_codebook().save("codebook.safetensors")   # the documented way to keep a fitted estimator
    vq = VectorQuantizer.from_codebook(Codebook.load("codebook.safetensors"))

``fit`` is :func:`vq_pipeline.fit_codebook` (Lloyd, exact assignment), ``predict`` is
:meth:`Codebook.encode`, ``partial_fit`` is :mod:`vq_pipeline.fitting.minibatch` (mini-batch K-means).

``transform`` gives distances as ``KMeans.transform`` does: the Euclidean distance (the square root
of the squared L2 distance) to every code under ``metric='l2'``; under ``'cosine'``, the Euclidean
distance between the unit row and the unit code, ``sqrt(2 (1 - cos))``, which is what
``KMeans.transform`` gives after fitting on L2-normalized rows. Its smallest entry in a row is that
row's distance to the code ``predict`` gives. ``score`` and ``inertia_`` keep the library's objective,
as ``KMeans.score`` is its negative inertia: the sum of squared L2 distances (``score(X) ==
-(transform(X).min(axis=1) ** 2).sum()``), or of ``1 - cos`` (half the squared ``transform``).
Outputs are numpy arrays: codes int64, centroids and distances float32 (the library computes in
float32).

``n_clusters`` is accepted as ``KMeans`` spells it: an alias of ``n_codes`` (see the class).
``verbose=True`` writes the progress lines of ``vq fit`` to stderr during ``fit``.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import numpy as np
import torch

try:
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_array, check_is_fitted, validate_data
except ImportError as exc:  # the sklearn extra is not installed
    raise ImportError(
        f"scikit-learn is not importable ({exc}); expected it for vq_pipeline.sklearn.VectorQuantizer. "
        f"Fix: pip install 'vq-pipeline[sklearn]'."
    ) from None

from vq_pipeline.codebook import Codebook
from vq_pipeline.errors import InvalidInputError, TooFewPointsError
from vq_pipeline.fitting.kmeans import fit_codebook
from vq_pipeline.fitting.multilevel import stated_objective
from vq_pipeline.fitting.minibatch import FIT_DEFAULTS as _DEFAULTS
from vq_pipeline.fitting.minibatch import MiniBatchState, start_minibatch, update_minibatch
from vq_pipeline.fitting.options import auto_inits
from vq_pipeline.settings import INITS, PER_DIMENSION_CODECS, FitSettings
from vq_pipeline.validate import as_embeddings, check_int, check_nonzero_rows, resolve_device


#: The estimator's default ``n_codes``: for scalar and binary codes, "the one count the codec takes".
_DEFAULT_N_CODES = 8


class VectorQuantizer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator):
    """K-means vector quantizer with scikit-learn's interface, over :func:`vq_pipeline.fit_codebook`.

    Parameters:
        n_codes: number of codes (``n_clusters`` of ``KMeans``).
        n_clusters: ``KMeans``' name of ``n_codes``: None (the default) or the number of codes, which
            then replaces ``n_codes``; an ``n_codes`` other than its default 8 must agree with it.
            Both are kept as given (``get_params`` and ``clone`` see what was passed).
        metric: 'l2' (squared Euclidean) or 'cosine' (rows and centroids L2-normalized).
        n_iter, tol: Lloyd's iteration limit and relative tolerance (``max_iter``/``tol`` of ``KMeans``).
        init: 'auto' (the default: k-means|| for flat and product codebooks, as in
            :func:`vq_pipeline.fit_codebook`), 'k-means++' (exact, scikit-learn's seeding), another
            named init of :func:`vq_pipeline.fit_codebook`, or a (n_codes, n_features) array of
            starting centroids.
        random_state: int seed (the library's ``seed``: ``random_state=s`` fits the codebook
            ``fit_codebook(X, n_codes, seed=s)`` fits), None or a ``RandomState`` (a seed is drawn from it).
        n_init: seeded restarts of ``fit``; the lowest objective wins. Unused by ``partial_fit``.
        engine, device, memory_budget: where and how the library computes (see ``fit_codebook``).
        codec, levels: 'flat' (default), or 'residual' / 'product' codes of ``levels`` codes per row
            (see ``fit_codebook``): ``predict`` and ``labels_`` then give (n_rows, levels) codes and
            ``inverse_transform`` decodes them; ``transform`` and ``partial_fit`` are for flat codes.
            'scalar' (``bits`` per dimension) and 'binary' (one bit per dimension) give one code per
            dimension: (n_rows, n_features) codes; their ``n_codes`` is ``2**bits`` and 2 (leave it at
            its default or pass that), their ``levels`` 1 or ``n_features``.
        rotation: 'none' (default), 'opq' or 'random' (product, residual), 'itq' or 'random' (binary):
            the orthogonal rotation of the rows before they are coded (see ``fit_codebook``).
        bits: 8 (default) or 4, bits per dimension of scalar codes. scalar_range: 'minmax' (default) or
            'quantile', how scalar codes calibrate each dimension's range. rotation_iters: rounds of
            learning an 'opq' or 'itq' rotation.
        verbose: ``fit`` writes the lines ``vq fit`` writes to stderr (seeding, then every
            iteration); 0 or False (the default): nothing.

    Attributes:
        cluster_centers_: (n_codes, n_features) float32, read-only (unit rows under cosine);
            (levels, n_codes, sub_dim) for a residual or product codebook.
        counts_: (n_codes,) int64, rows assigned to each code (by the last E step of ``fit``; over
            every batch for ``partial_fit``).
        labels_: (n_rows,) int64 codes of the rows of the last ``fit`` (of the last batch after
            ``partial_fit``, against the updated codes). Absent after :meth:`from_codebook`.
        inertia_: the objective of those rows: the sum of squared L2 distances, or of ``1 - cos``.
        n_iter_: Lloyd's centroid updates in the last ``fit`` (0 after ``partial_fit`` alone).
        n_steps_: batches absorbed by ``partial_fit`` (0 after ``fit``).
        n_features_in_, feature_names_in_: as every scikit-learn estimator sets them.

    The parameters that define the codes (``n_codes``, ``metric``, ``codec``, ``levels``, ``rotation``,
    ``bits``, ``scalar_range``) always
    describe the fitted codebook: :meth:`from_codebook` refuses overrides that contradict its
    codebook, and after ``set_params`` changes one of them on a fitted estimator, ``predict``,
    ``transform``, ``score``, ``inverse_transform`` and ``partial_fit`` raise
    :class:`~vq_pipeline.errors.InvalidInputError` (parameters are checked when used, as in
    scikit-learn) until ``fit`` fits the new ones, so that ``get_params()`` never describes codes
    other than those used, and ``clone(est).fit(X)`` fits the codebook ``est``'s parameters say.
    Parameters that only steer a fit or the computation (``n_iter``, ``tol``, ``init``,
    ``random_state``, ``n_init``, ``engine``, ``device``, ``memory_budget``, ``rotation_iters``) may change at
    any time.
    """

    def __init__(
        self,
        n_codes: int = 8,
        *,
        metric: str = _DEFAULTS["metric"],
        n_iter: int = _DEFAULTS["n_iter"],
        tol: float = _DEFAULTS["tol"],
        init: Any = _DEFAULTS["init"],
        random_state: Any = _DEFAULTS["seed"],
        n_init: int = _DEFAULTS["n_init"],
        engine: str = _DEFAULTS["engine"],
        device: Any = _DEFAULTS["device"],
        memory_budget: int = _DEFAULTS["memory_budget"],
        codec: str = _DEFAULTS["codec"],
        levels: int = _DEFAULTS["levels"],
        n_clusters: int | None = None,
        verbose: int = 0,
        rotation: str = FitSettings.rotation,
        bits: int = FitSettings.bits,
        scalar_range: str = FitSettings.scalar_range,
        rotation_iters: int = FitSettings.rotation_iters,
    ) -> None:
        self.n_codes = n_codes
        self.metric = metric
        self.n_iter = n_iter
        self.tol = tol
        self.init = init
        self.random_state = random_state
        self.n_init = n_init
        self.engine = engine
        self.device = device
        self.memory_budget = memory_budget
        self.codec = codec
        self.levels = levels
        self.n_clusters = n_clusters
        self.verbose = verbose
        self.rotation = rotation
        self.bits = bits
        self.scalar_range = scalar_range
        self.rotation_iters = rotation_iters

    # ------------------------------------------------------------------ fitting

    def fit(self, X: Any, y: Any = None) -> VectorQuantizer:
        """Fit the codes with Lloyd's algorithm (:func:`vq_pipeline.fit_codebook`).

        Args:
            X: (n_rows, n_features) array-like, ``n_rows >= n_codes``. y: ignored.
        """
        X = self._validate(X, reset=True)
        n_codes = self._check_shape(X)
        if self.codec not in PER_DIMENSION_CODECS and X.shape[0] < n_codes:
            raise TooFewPointsError(
                f"X has n_samples={X.shape[0]} rows but n_codes={n_codes}; expected at least n_codes rows. "
                f"Fix: lower n_codes to at most {X.shape[0]}, or fit on more rows."
            )
        codebook = fit_codebook(
            X,
            n_codes,
            metric=self.metric,
            n_iter=self.n_iter,
            tol=self.tol,
            init=self._init_value(),
            seed=self._seed(),
            n_init=self.n_init,
            codec=self.codec,
            levels=self.levels,
            verbose=self._verbose(),
            **self._codec_params(),
            **self._compute(),
        )
        self._set_codebook(codebook)
        self._stream = None
        self.labels_, self.inertia_ = self._labels_inertia(X)
        self.n_iter_ = int(codebook.stats.get("iterations", 0))
        self.n_steps_ = 0
        return self

    def partial_fit(self, X: Any, y: Any = None) -> VectorQuantizer:
        """Absorb one batch with mini-batch K-means (:mod:`vq_pipeline.fitting.minibatch`).

        The first call (on an estimator neither fitted nor loaded) seeds the codes from its batch,
        which needs at least ``n_codes`` rows, and runs a few Lloyd iterations on it; later calls
        assign each row its exact nearest code, move the codes to the running means of their rows,
        assign again, and split crowded codes with under-used ones where that pays (the defaults of
        :data:`vq_pipeline.fitting.minibatch.STREAM_DEFAULTS`). After ``fit`` or :meth:`from_codebook`, the
        codebook's counts weigh its centroids.

        Args:
            X: (n_rows, n_features) array-like batch. y: ignored.
        """
        first = not hasattr(self, "cluster_centers_")
        if not first:
            self._check_model_params("partial_fit")
        self._flat_only("partial_fit", self.codec if first else self._codebook.codec)
        X = self._validate(X, reset=first)
        if first:
            n_codes = self._check_shape(X)
            init, seed = self._init_value(), self._seed()
            settings = FitSettings(metric=self.metric, init=init, seed=seed, **self._compute())
            state = start_minibatch(X, n_codes, settings)
            self.n_iter_ = 0
        else:
            state = self._stream if self._stream is not None else MiniBatchState.from_codebook(self._codebook)
            state = update_minibatch(state, X, **self._compute())
        self._stream = state
        self._set_codebook(state.to_codebook())
        self.labels_, self.inertia_ = self._labels_inertia(X)
        self.n_steps_ = getattr(self, "n_steps_", 0) + 1
        return self

    # ------------------------------------------------------------------ using the codes

    def predict(self, X: Any) -> np.ndarray:
        """(n_rows,) int64: the nearest code of every row (:meth:`Codebook.encode`, exact); (n_rows,
        levels) for a residual or product codebook, (n_rows, n_features) for a scalar or binary one (one
        code per dimension, unpacked: ``to_codebook().pack`` gives the bytes a code table stores)."""
        check_is_fitted(self)
        self._check_model_params("predict")
        X = self._validate(X, reset=False)
        return _numpy(self._codebook.encode(X, **self._compute()))

    def transform(self, X: Any) -> np.ndarray:
        """(n_rows, n_codes) float32 distances to every code, as ``KMeans.transform`` gives them: the
        Euclidean distance under 'l2', ``sqrt(2 (1 - cos))`` (between unit vectors) under 'cosine'.

        Computed in float64 on the compute device (exact to float32 rounding), ``memory_budget``
        bytes of temporaries at a time.
        """
        check_is_fitted(self)
        self._check_model_params("transform")
        self._flat_only("transform", self._codebook.codec)
        return self._distances(self._validate(X, reset=False))

    def score(self, X: Any, y: Any = None) -> float:
        """Negative inertia of ``X``: minus the sum over rows of the distance to the nearest code
        (squared L2, or ``1 - cos``), as ``KMeans.score``. y: ignored."""
        check_is_fitted(self)
        self._check_model_params("score")
        return -self._labels_inertia(self._validate(X, reset=False))[1]

    def inverse_transform(self, X: Any) -> np.ndarray:
        """Decode: (n_rows, n_features) float32, the centroid of each row's code.

        Args:
            X: (n_rows,) integer codes (what :meth:`predict` returns), or the (n_rows, n_codes)
                distances :meth:`transform` returns (each row decodes to its nearest code); for a
                residual, product, scalar or binary codebook, the (n_rows, levels) codes :meth:`predict`
                returns.
        """
        check_is_fitted(self)
        self._check_model_params("inverse_transform")
        if self._codebook.codec != "flat":
            return _numpy(self._codebook.decode(check_array(X, dtype=None)))
        n_codes = self.cluster_centers_.shape[0]
        a = check_array(X, ensure_2d=False, dtype=None)
        if a.ndim == 2 and a.shape[1] == n_codes and a.dtype.kind in "fiu":
            codes = a.argmin(axis=1)
        elif a.ndim == 1 and a.dtype.kind in "iu":
            codes = a.astype(np.int64)
            bad = (codes < 0) | (codes >= n_codes)
            if bad.any():
                i = int(bad.nonzero()[0][0])
                raise InvalidInputError(
                    f"codes[{i}]={codes[i]} is out of range; expected codes between 0 and {n_codes - 1}. "
                    f"Fix: decode codes this estimator's predict gave."
                )
        else:
            raise InvalidInputError(
                f"X.shape={a.shape}, dtype={a.dtype}; expected (n_rows,) integer codes or (n_rows, {n_codes}) "
                f"distances. Fix: pass what predict or transform returned."
            )
        return self.cluster_centers_[codes]

    # ------------------------------------------------------------------ the codebook file

    def to_codebook(self) -> Codebook:
        """The fitted :class:`Codebook` (save it with ``.save(path)``: the estimator's file format)."""
        check_is_fitted(self)
        return self._codebook

    @classmethod
    def from_codebook(cls, codebook: Codebook, **params: Any) -> VectorQuantizer:
        """A fitted estimator that encodes with ``codebook``; its parameters come from the codebook's
        settings, overridden by ``params``. ``partial_fit`` continues from it; ``labels_`` is unset.

        ``params`` may set how later fits run and where the estimator computes, not what the codebook
        is: an ``n_codes`` (or ``n_clusters``), ``metric``, ``codec`` or ``levels`` other than the
        codebook's raises :class:`~vq_pipeline.errors.InvalidInputError`."""
        settings = codebook.settings
        found: dict[str, Any] = _model_params(codebook)
        for key, value in [*found.items(), ("n_clusters", codebook.n_codes)]:
            if key in params and not (key == "n_clusters" and params[key] is None) and not _same(params[key], value):
                raise InvalidInputError(
                    f"from_codebook({key}={params[key]!r}) but the codebook has {key}={value!r}; expected the "
                    f"codebook's own {key} (the estimator encodes with the codebook as it is). Fix: leave {key} out "
                    f"of from_codebook, or fit VectorQuantizer({key}={params[key]!r}) on the data to get such codes."
                )
        for ours, key in (
            ("n_iter", "n_iter"),
            ("tol", "tol"),
            ("random_state", "seed"),
            ("n_init", "n_init"),
            ("rotation_iters", "rotation_iters"),
        ):
            if key in settings:
                found[ours] = settings[key]
        if settings.get("init") in INITS:
            # A file records the init used; "auto" is what resolves to it for this codec.
            auto = settings["init"] in auto_inits(codebook.codec)
            found["init"] = "auto" if auto else settings["init"]
        est = cls(**{**found, **params})
        est._set_codebook(codebook)
        est._stream = None
        est.n_features_in_ = codebook.dim
        est.n_iter_ = int(codebook.stats.get("iterations", 0))
        est.n_steps_ = 0
        inertia = stated_objective(codebook)  # the sum of 1 - cos under cosine, as encode's distances
        if inertia is not None:
            est.inertia_ = inertia
        return est

    # ------------------------------------------------------------------ helpers

    @property
    def _n_features_out(self) -> int:
        return self.cluster_centers_.shape[0]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]  # the library computes in float32
        return tags

    def _validate(self, X: Any, *, reset: bool) -> np.ndarray:
        """(n_rows, n_features) float32 C-ordered numpy rows; sets or checks n_features_in_."""
        return validate_data(self, X, reset=reset, dtype=np.float32, order="C")

    def _check_shape(self, X: np.ndarray) -> int:
        """n_codes, validated, when the first rows ``X`` can seed it (the row count is the fit's to check)."""
        n_codes = self._n_codes()
        if self.codec in PER_DIMENSION_CODECS and _same(n_codes, _DEFAULT_N_CODES):
            n_codes = 2 if self.codec == "binary" else 2**self.bits  # not given: the one count the codec takes
        n_codes = check_int("n_codes", n_codes, minimum=1, hint="n_codes is the number of codes to fit.")
        if self.metric == "cosine" and X.shape[1] == 1 and n_codes > 2:
            raise TooFewPointsError(
                f"X has n_features=1 and metric='cosine': every row's direction is -1 or +1, so at most 2 codes "
                f"can differ, but n_codes={n_codes}. Fix: use metric='l2' for one feature, or n_codes <= 2."
            )
        return n_codes

    def _check_model_params(self, what: str) -> None:
        """Refuse to use the fitted codebook when a parameter that defines it was changed since (set_params)."""
        for key, fitted in _model_params(self._codebook).items():
            value = self._n_codes() if key == "n_codes" else getattr(self, key)
            if self._codebook.codec in PER_DIMENSION_CODECS:  # n_codes and levels follow bits and the width
                if key == "n_codes" and _same(value, _DEFAULT_N_CODES):
                    value = fitted
                if key == "levels" and _same(value, 1):
                    value = fitted
            if not _same(value, fitted):
                raise InvalidInputError(
                    f"{key}={value!r} but the fitted codebook has {key}={fitted!r}: {key} changed after fit, so "
                    f"{what} would not use the codes the parameters describe; expected the fitted {key}. Fix: call "
                    f"fit to fit codes with {key}={value!r}, or set_params({key}={fitted!r}) to use the fitted codes."
                )

    @staticmethod
    def _flat_only(what: str, codec: str) -> None:
        if codec != "flat":
            raise InvalidInputError(
                f"{what} needs a flat codebook but this estimator has codec={codec!r}; expected codec='flat'. "
                f"Fix: use predict and inverse_transform with {codec} codes, or fit with codec='flat'."
            )

    def _n_codes(self) -> Any:
        """The number of codes the parameters ask for: ``n_clusters`` when set (it replaces ``n_codes``,
        which must then be at its default or agree), else ``n_codes``."""
        if self.n_clusters is None:
            return self.n_codes
        default = inspect.signature(type(self)).parameters["n_codes"].default
        if not _same(self.n_codes, default) and not _same(self.n_codes, self.n_clusters):
            raise InvalidInputError(
                f"n_codes={self.n_codes!r} and n_clusters={self.n_clusters!r} disagree; expected one number of "
                f"codes (n_clusters is scikit-learn's name of n_codes). Fix: pass only one of them, or the same "
                f"number to both."
            )
        return self.n_clusters

    def _verbose(self) -> bool:
        if isinstance(self.verbose, bool | numbers.Integral):
            return bool(self.verbose)
        raise InvalidInputError(
            f"verbose={self.verbose!r}; expected False/0 or True/1. Fix: pass verbose=1 to print the fit's progress."
        )

    def _codec_params(self) -> dict[str, Any]:
        """The fit's codec keywords: rotation and, for scalar codes, bits and range (left out at their defaults,
        so that a fit of the earlier codecs is called as before)."""
        given = {
            "rotation": self.rotation,
            "bits": self.bits,
            "scalar_range": self.scalar_range,
            "rotation_iters": self.rotation_iters,
        }
        return {k: v for k, v in given.items() if not _same(v, getattr(FitSettings, k))}

    def _compute(self) -> dict[str, Any]:
        return {"engine": self.engine, "device": self.device, "memory_budget": self.memory_budget}

    def _seed(self) -> Any:
        """The library's seed: an int random_state as is (validated there), else one drawn from it."""
        if isinstance(self.random_state, numbers.Integral):
            return self.random_state
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _init_value(self) -> Any:
        """``init`` for the library: a name, or a private float32 copy of the given centroids."""
        if isinstance(self.init, str | Codebook):
            return self.init
        return np.array(self.init, dtype=np.float32, copy=True)

    def _set_codebook(self, codebook: Codebook) -> None:
        self._codebook = codebook
        centers = codebook.centroids.numpy().copy()  # (n_codes, dim) float32
        centers.flags.writeable = False  # the codebook encodes; editing a copy of it would change nothing
        self.cluster_centers_ = centers
        self.counts_ = codebook.counts.numpy().copy()

    def _labels_inertia(self, X: np.ndarray) -> tuple[np.ndarray, float]:
        codes, dist = self._codebook.encode(X, return_distances=True, **self._compute())
        return _numpy(codes), float(_numpy(dist).sum(dtype=np.float64))

    def _distances(self, X: np.ndarray) -> np.ndarray:
        """(n_rows, n_codes) float32 Euclidean distances of validated rows ``X`` to every code (between
        unit vectors under cosine), in chunks."""
        cb = self._codebook
        x = as_embeddings(X)  # (n_rows, dim) float32, refuses what the library refuses
        cosine = cb.metric == "cosine"
        if cosine:
            check_nonzero_rows(x)
        dev = resolve_device(self.device, x)
        c = cb.centroids.to(dev, torch.float64)  # (n_codes, dim)
        if cosine:  # unit in float32 only: 1 - cos of a near-identical pair would lose its digits to that
            c = c / torch.linalg.vector_norm(c, dim=1, keepdim=True)
        # Shifting both sides by the centroids' mean leaves distances unchanged and keeps the
        # expansion |x|^2 + |c|^2 - 2 x.c well conditioned for data far from the origin.
        shift = torch.zeros_like(c[0]) if cosine else c.mean(dim=0)  # (dim,)
        c = c - shift
        c_sq = c.square().sum(dim=1)  # (n_codes,)
        n_codes, dim = c.shape
        budget = check_int("memory_budget", self.memory_budget, minimum=1)
        rows = max(1, budget // (8 * 3 * (n_codes + dim)))  # float64 chunk, products, distances
        out = np.empty((x.shape[0], n_codes), dtype=np.float32)
        for start in range(0, x.shape[0], rows):
            xb = x[start : start + rows].to(dev, torch.float64)  # (b, dim)
            if cosine:  # |a - b|^2 = 2 (1 - cos) for unit a, b
                xb = xb / torch.linalg.vector_norm(xb, dim=1, keepdim=True)
                d = (2.0 * (1.0 - xb @ c.T)).clamp_(0.0, 4.0)  # (b, n_codes) squared distances
            else:
                xb = xb - shift
                d = (xb.square().sum(dim=1, keepdim=True) + c_sq - 2.0 * (xb @ c.T)).clamp_(min=0.0)
            out[start : start + rows] = d.sqrt_().to("cpu", torch.float32).numpy()
        return out


def _model_params(codebook: Codebook) -> dict[str, Any]:
    """The estimator parameters that ``codebook`` fixes: what its codes are (the earlier codecs' four, then
    the rotation, and a scalar codebook's bits and range, recorded in its fit settings)."""
    found = {"n_codes": codebook.n_codes, "metric": codebook.metric, "codec": codebook.codec, "levels": codebook.levels}
    settings = codebook.settings if isinstance(codebook.settings, dict) else {}
    found["rotation"] = settings.get("rotation", FitSettings.rotation)
    if codebook.codec == "scalar":
        found["bits"] = int(codebook.n_codes).bit_length() - 1  # n_codes is 2**bits
        found["scalar_range"] = settings.get("scalar_range", FitSettings.scalar_range)
    return found


def _same(value: Any, fitted: Any) -> bool:
    """Whether a parameter's ``value`` is the ``fitted`` one (``8`` and ``np.int64(8)`` are; ``True`` and ``1`` not)."""
    if isinstance(fitted, str):
        return isinstance(value, str) and value == fitted
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and int(value) == fitted


def _numpy(a: Any) -> np.ndarray:
    """A CPU tensor or array as a numpy array (encode answers numpy input with either, by version)."""
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


__all__ = ["VectorQuantizer"]
