"""Recipe: the tensors and settings that calibration produces and the backend applies.

A recipe holds tensors keyed ``<parameter fqn>::<what>``, e.g.
``transformer.blocks.0.q_proj.weight::sgat.P1`` or ``transformer.blocks.0.attn_out.weight::tac.M``,
plus JSON metadata: method, bits, mask token id, method options, a fingerprint of the model it was
calibrated on (every parameter name and shape) and the library versions that made it.

On disk (``format_version`` 1) a recipe is ONE safetensors file. Its string metadata holds
``"stq_recipe"``: a JSON object with the fields above and ``tensor_sha256``, the SHA-256 of each
tensor's raw bytes, so a damaged data section is caught at load time. ``load`` either returns a
complete, verified recipe or raises ``RecipeError`` naming the file and the problem; a recipe that
does not fit the model being compiled is refused by ``check_fits`` / ``check_tensor_keys`` with
``RecipeMismatchError`` naming the first parameter that differs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import operator
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import safetensors
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stq_compiler.options import BITS_CHOICES

FORMAT_VERSION = 1
METADATA_KEY = "stq_recipe"
KEY_SEPARATOR = "::"
METHODS = ("rtn", "smoothquant", "quarot", "starquant")
SUFFIX = ".stq"

# Fields of the "stq_recipe" JSON object of format_version 1.
_HEADER_FIELDS = (
    "format_version",
    "method",
    "w_bits",
    "a_bits",
    "mask_token_id",
    "options",
    "fingerprint",
    "versions",
    "tensor_sha256",
)


class RecipeError(ValueError):
    """A recipe that cannot be built, saved or loaded; the message names the file or field."""


class RecipeMismatchError(RecipeError):
    """A recipe that does not fit the model (or graph) it is applied to."""


# ---------------------------------------------------------------------------------------------
# fingerprints


def _dims(name: str, shape: Iterable[Any]) -> list[int]:
    try:
        raw = list(shape)
        dims = [operator.index(d) for d in raw]
    except TypeError as exc:
        raise RecipeError(f"parameter {name!r} has shape {shape!r}, not a sequence of ints") from exc
    if any(isinstance(d, bool) for d in raw) or any(d < 0 for d in dims):
        raise RecipeError(f"parameter {name!r} has shape {raw!r}, not a sequence of non-negative ints")
    return dims


def fingerprint_of(named_shapes: Iterable[tuple[str, Iterable[int]]]) -> dict:
    """``{"parameters": {name: [dims]} (sorted by name), "sha256": hash of the "name:[dims]" lines}``.

    A name may repeat only with the same shape (tied weights listed twice)."""
    parameters: dict[str, list[int]] = {}
    for name, shape in named_shapes:
        if not isinstance(name, str) or not name:
            raise RecipeError(f"parameter names must be non-empty strings, got {name!r}")
        dims = _dims(name, shape)
        if parameters.setdefault(name, dims) != dims:
            raise RecipeError(f"parameter {name} is listed twice, with shapes {parameters[name]} and {dims}")
    parameters = dict(sorted(parameters.items()))
    lines = "\n".join(f"{name}:{json.dumps(dims)}" for name, dims in parameters.items())
    return {"parameters": parameters, "sha256": hashlib.sha256(lines.encode()).hexdigest()}


def fingerprint_from_model(model: torch.nn.Module) -> dict:
    """The fingerprint of a module's parameters (``named_parameters``: tied weights once)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module
    return fingerprint_of((name, p.shape) for name, p in model.named_parameters())


def fingerprint_from_bindings(bindings: Mapping[Any, Any] | Iterable[Any]) -> dict:
    """The fingerprint of the parameters a captured graph sees: the values of
    ``capture.bind_tensors`` (``.fqn``, ``.tensor``, ``.is_parameter``); buffers are left out."""
    values = bindings.values() if isinstance(bindings, Mapping) else bindings
    return fingerprint_of((b.fqn, b.tensor.shape) for b in values if b.is_parameter)


def _canonical_fingerprint(fingerprint: Any) -> dict:
    """A fingerprint dict checked and rebuilt from its parameter list; its sha256 must agree."""
    if not isinstance(fingerprint, Mapping) or not isinstance(fingerprint.get("parameters"), Mapping):
        raise RecipeError(
            "fingerprint must be a dict {'parameters': {name: shape}, 'sha256': ...} "
            "as made by fingerprint_of / fingerprint_from_model"
        )
    extra = sorted(set(fingerprint) - {"parameters", "sha256"})
    if extra:
        raise RecipeError(f"fingerprint has unknown field(s) {', '.join(map(repr, extra))}")
    canonical = fingerprint_of(fingerprint["parameters"].items())
    recorded = fingerprint.get("sha256")
    if recorded is not None and recorded != canonical["sha256"]:
        raise RecipeError(
            f"fingerprint sha256 {recorded!r} does not match its parameter list (which hashes to "
            f"{canonical['sha256']!r}): the fingerprint was edited or damaged"
        )
    return canonical


def _as_fingerprint(other: Any) -> dict:
    """A fingerprint from a fingerprint dict, a module, a {name: shape} mapping, or (name, shape) pairs."""
    if isinstance(other, torch.nn.Module):
        return fingerprint_from_model(other)
    if isinstance(other, Mapping):
        if "parameters" in other:
            return _canonical_fingerprint(other)
        return fingerprint_of(other.items())
    return fingerprint_of(other)


# ---------------------------------------------------------------------------------------------
# tensors and JSON values


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (what safetensors writes, little-endian)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_raw_bytes(tensor).numpy()).hexdigest()


def _copy_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A byte-for-byte copy of a tensor read from a file. Not ``clone()``: cloning a bool tensor
    rewrites every nonzero byte as 1, which would hide a damaged byte from the hash. And a copy,
    not a view of the memory-mapped file: what we verify is what we return."""
    return _raw_bytes(tensor).clone().view(tensor.dtype).reshape(tensor.shape)


def _tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: same dtype, same shape, same bytes (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_raw_bytes(a), _raw_bytes(b))


def _for_file(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors refuses tensors sharing memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if tensor.nbytes and (storage.nbytes() != tensor.nbytes or storage.data_ptr() in seen):
            tensor = tensor.clone()  # a view into a larger or shared storage: write only its bytes
        if tensor.nbytes:
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _json_value(value: Any, what: str) -> Any:
    """``value`` as it will read back from JSON (tuples become lists); refuses what JSON can't hold."""
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{what} must be JSON-serialisable (no NaN/inf): {exc}") from exc
    return json.loads(text)


def current_versions() -> dict[str, Optional[str]]:
    """Versions of the libraries a recipe depends on, as recorded in a new recipe."""
    from importlib import metadata

    def dist(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "stq_compiler": dist("stq_compiler"),
        "torch": str(torch.__version__),
        "transformers": dist("transformers"),
        "safetensors": safetensors.__version__,
    }


def _names(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# the recipe


@dataclass(eq=False)
class Recipe:
    """Calibrated tensors keyed ``fqn::what`` plus the metadata that says how to apply them.

    ``options`` (method options, e.g. ``{"gptq": True, "tac": True, "sgat": True, "group": 16}``),
    ``fingerprint`` and ``versions`` are stored as JSON: they are kept as their JSON round trip
    (tuples become lists). ``versions`` defaults to the installed library versions.
    """

    method: str
    w_bits: int
    a_bits: int
    mask_token_id: Optional[int]
    options: dict
    tensors: dict[str, torch.Tensor]
    fingerprint: dict
    versions: Optional[dict] = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.versions is None:
            self.versions = current_versions()
        self.tensors = dict(self.tensors)
        self._validate()

    # -- validation ----------------------------------------------------------------------------

    def _validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise RecipeError(
                f"format_version {self.format_version!r} is not supported; this stq_compiler "
                f"reads and writes format_version {FORMAT_VERSION}"
            )
        if self.method not in METHODS:
            raise RecipeError(f"method {self.method!r} is not one of {METHODS}")
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if not _is_int(value) or value not in BITS_CHOICES:
                raise RecipeError(f"{name}={value!r} is not a supported bit width; choose one of {BITS_CHOICES}")
        if self.mask_token_id is not None and (not _is_int(self.mask_token_id) or self.mask_token_id < 0):
            raise RecipeError(f"mask_token_id must be None or a non-negative int, got {self.mask_token_id!r}")
        if not isinstance(self.options, dict):
            raise RecipeError(f"options must be a dict, got {type(self.options).__name__}")
        self.options = _json_value(self.options, "options")
        if not isinstance(self.versions, dict):
            raise RecipeError(f"versions must be a dict, got {type(self.versions).__name__}")
        self.versions = _json_value(self.versions, "versions")
        self.fingerprint = _canonical_fingerprint(self.fingerprint)
        if not isinstance(self.tensors, dict):
            raise RecipeError(f"tensors must be a dict of str -> Tensor, got {type(self.tensors).__name__}")
        for key, tensor in self.tensors.items():
            self.split_key(key)
            if not isinstance(tensor, torch.Tensor):
                raise RecipeError(f"recipe tensor {key} is a {type(tensor).__name__}, not a torch.Tensor")
            if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
                raise RecipeError(
                    f"recipe tensor {key} must be a dense tensor with data (got {tensor.layout}, {tensor.device})"
                )

    # -- keys ----------------------------------------------------------------------------------

    @staticmethod
    def key(fqn: str, suffix: str) -> str:
        """``"<fqn>::<suffix>"``, e.g. ``key("blocks.0.q_proj.weight", "sgat.P1")``."""
        if not isinstance(fqn, str) or not fqn or KEY_SEPARATOR in fqn:
            raise RecipeError(f"parameter name {fqn!r} must be a non-empty string without {KEY_SEPARATOR!r}")
        if not isinstance(suffix, str) or not suffix:
            raise RecipeError(f"tensor suffix for {fqn} must be a non-empty string, got {suffix!r}")
        return f"{fqn}{KEY_SEPARATOR}{suffix}"

    @staticmethod
    def split_key(key: str) -> tuple[str, str]:
        """``"fqn::suffix"`` -> ``("fqn", "suffix")``; the suffix may itself contain ``::``."""
        fqn, sep, suffix = key.partition(KEY_SEPARATOR) if isinstance(key, str) else ("", "", "")
        if not sep or not fqn or not suffix:
            raise RecipeError(
                f"recipe tensor key {key!r} is not of the form '<parameter fqn>{KEY_SEPARATOR}<what>'"
            )
        return fqn, suffix

    def for_parameter(self, fqn: str) -> dict[str, torch.Tensor]:
        """``{suffix: tensor}`` for every key ``fqn::suffix`` ({} when the recipe has none)."""
        prefix = fqn + KEY_SEPARATOR
        return {key[len(prefix):]: t for key, t in sorted(self.tensors.items()) if key.startswith(prefix)}

    def parameter_fqns(self) -> list[str]:
        """The parameters the recipe's tensors belong to, sorted."""
        return sorted({self.split_key(key)[0] for key in self.tensors})

    # -- fitting a model -----------------------------------------------------------------------

    @staticmethod
    def fingerprint_of(named_shapes: Iterable[tuple[str, Iterable[int]]]) -> dict:
        return fingerprint_of(named_shapes)

    def check_fits(self, other: Any, *, subset: bool = False) -> None:
        """Refuse, with ``RecipeMismatchError`` naming the first difference in sorted name order,
        a model whose parameters differ from those the recipe was calibrated on.

        ``other``: a fingerprint, an ``nn.Module``, a ``{name: shape}`` mapping or (name, shape)
        pairs. ``subset=True`` is for one captured graph of a model with graph breaks: it may see
        only some of the parameters, but each one it sees must be the recipe's, with its shape.
        """
        theirs = _as_fingerprint(other)
        if not subset and theirs["sha256"] == self.fingerprint["sha256"]:
            return
        ours, model = self.fingerprint["parameters"], theirs["parameters"]
        problems = []
        for name in sorted(ours.keys() | model.keys()):
            if name not in model:
                if not subset:
                    problems.append(
                        f"recipe was made for a model with parameter {name} {ours[name]}, "
                        "this model has no such parameter"
                    )
            elif name not in ours:
                problems.append(
                    f"this model has parameter {name} {model[name]}, which the recipe's model did not have"
                )
            elif ours[name] != model[name]:
                problems.append(
                    f"parameter {name} has shape {model[name]} in this model but {ours[name]} "
                    "in the model the recipe was made for"
                )
        if problems:
            more = f" (and {len(problems) - 1} more mismatch(es))" if len(problems) > 1 else ""
            raise RecipeMismatchError(
                f"{self.method} W{self.w_bits}A{self.a_bits} recipe does not fit this model: {problems[0]}{more}"
            )

    def check_tensor_keys(self, available_fqns: Any) -> None:
        """Refuse a recipe with a tensor for a parameter the model does not have.

        ``available_fqns``: parameter names (or a fingerprint / ``nn.Module``)."""
        if isinstance(available_fqns, torch.nn.Module) or (
            isinstance(available_fqns, Mapping) and "parameters" in available_fqns
        ):
            available = set(_as_fingerprint(available_fqns)["parameters"])
        else:
            available = set(available_fqns)
        unknown = sorted(key for key in self.tensors if self.split_key(key)[0] not in available)
        if unknown:
            fqn = self.split_key(unknown[0])[0]
            close = difflib.get_close_matches(fqn, sorted(available), n=1)
            hint = f" (closest parameter: {close[0]})" if close else ""
            more = f"; {len(unknown) - 1} more key(s) like it" if len(unknown) > 1 else ""
            raise RecipeMismatchError(
                f"recipe tensor {unknown[0]} is for parameter {fqn}, which this model does not have{hint}{more}"
            )

    # -- file I/O ------------------------------------------------------------------------------

    def _metadata(self) -> dict:
        return {
            "format_version": self.format_version,
            "method": self.method,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "mask_token_id": self.mask_token_id,
            "options": self.options,
            "fingerprint": self.fingerprint,
            "versions": self.versions,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe as one safetensors file, atomically (temp file + rename); returns the path.

        ``.stq`` is the customary suffix; any path works."""
        self._validate()
        path = Path(path)
        tensors = _for_file(self.tensors)
        header = {**self._metadata(), "tensor_sha256": {key: tensor_sha256(t) for key, t in tensors.items()}}
        metadata = {"format": "pt", METADATA_KEY: json.dumps(header, sort_keys=True)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as handle:  # the data is on disk before the name points at it
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        """Read and verify a recipe file; a complete recipe (tensors on CPU) or ``RecipeError``."""
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"recipe file {path} does not exist")
        if not path.is_file():
            raise RecipeError(f"recipe path {path} is not a file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = sorted(handle.keys())
                header = _read_header(path, handle.metadata() or {})
                hashes = header["tensor_sha256"]
                _check_hash_list(path, names, hashes)
                tensors = {name: _copy_bytes(handle.get_tensor(name)) for name in names}
        except RecipeError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise RecipeError(
                f"{path} is not a readable safetensors file (not safetensors, truncated, or damaged): {exc}"
            ) from exc
        damaged = [name for name in names if tensor_sha256(tensors[name]) != hashes[name]]
        if damaged:
            raise RecipeError(
                f"recipe file {path} is damaged: the bytes of tensor(s) {_names(damaged)} do not match "
                "their recorded sha256"
            )
        try:
            return cls(
                method=header["method"],
                w_bits=header["w_bits"],
                a_bits=header["a_bits"],
                mask_token_id=header["mask_token_id"],
                options=header["options"],
                tensors=tensors,
                fingerprint=header["fingerprint"],
                versions=header["versions"],
                format_version=header["format_version"],
            )
        except RecipeError as exc:
            raise RecipeError(f"recipe file {path}: {exc}") from exc

    # -- comparison and display ----------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        return (
            self._metadata() == other._metadata()
            and self.tensors.keys() == other.tensors.keys()
            and all(_tensors_equal(t, other.tensors[key]) for key, t in self.tensors.items())
        )

    __hash__ = None  # mutable

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def digest(self) -> str:
        """SHA-256 of what the recipe does (metadata except versions, tensor dtypes, shapes and
        bytes): equal for equal recipes, whoever made them; a key for compile caches."""
        content = {k: v for k, v in self._metadata().items() if k != "versions"}
        content["tensors"] = {
            key: [str(t.dtype), list(t.shape), tensor_sha256(t)] for key, t in sorted(self.tensors.items())
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def summary(self) -> str:
        mask = "none" if self.mask_token_id is None else self.mask_token_id
        n_params = len(self.fingerprint["parameters"])
        options = json.dumps(self.options, sort_keys=True)
        return (
            f"{self.method} W{self.w_bits}A{self.a_bits} recipe, mask token id {mask}, options {options}; "
            f"{len(self.tensors)} tensors for {len(self.parameter_fqns())} parameters, {_format_bytes(self.nbytes)}; "
            f"model fingerprint {self.fingerprint['sha256'][:12]} ({n_params} parameters)"
        )

    def __repr__(self) -> str:
        return (
            f"Recipe(method={self.method!r}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
            f"mask_token_id={self.mask_token_id!r}, options={self.options!r}, tensors={len(self.tensors)}, "
            f"nbytes={self.nbytes}, fingerprint={self.fingerprint['sha256'][:12]!r})"
        )


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _read_header(path: Path, metadata: Mapping[str, str]) -> dict:
    """The checked ``stq_recipe`` JSON object of a file's safetensors metadata."""
    blob = metadata.get(METADATA_KEY)
    if blob is None:
        raise RecipeError(
            f"{path} is a safetensors file but not a stq recipe: it has no {METADATA_KEY!r} metadata"
        )
    try:
        header = json.loads(blob)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"recipe file {path}: its {METADATA_KEY!r} metadata is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise RecipeError(f"recipe file {path}: its {METADATA_KEY!r} metadata is not a JSON object")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        versions = header.get("versions")
        made_by = versions.get("stq_compiler") if isinstance(versions, dict) else None
        by = f" (written by stq_compiler {made_by})" if made_by else ""
        raise RecipeError(
            f"recipe file {path} has format_version {version!r}{by}; this stq_compiler reads "
            f"format_version {FORMAT_VERSION}"
        )
    missing = [f for f in _HEADER_FIELDS if f not in header]
    unknown = sorted(set(header) - set(_HEADER_FIELDS))
    if missing or unknown:
        parts = ([f"missing field(s) {', '.join(missing)}"] if missing else []) + (
            [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
        )
        raise RecipeError(f"recipe file {path}: its {METADATA_KEY!r} metadata has {'; '.join(parts)}")
    hashes = header["tensor_sha256"]
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise RecipeError(f"recipe file {path}: tensor_sha256 must map tensor names to hex digests")
    return header


def _check_hash_list(path: Path, names: list[str], hashes: Mapping[str, str]) -> None:
    unhashed = set(names) - hashes.keys()
    if unhashed:
        raise RecipeError(f"recipe file {path} holds tensor(s) missing from its hash list: {_names(unhashed)}")
    absent = hashes.keys() - set(names)
    if absent:
        raise RecipeError(f"recipe file {path} lacks tensor(s) its hash list records: {_names(absent)}")


__all__ = [
    "FORMAT_VERSION",
    "METHODS",
    "Recipe",
    "RecipeError",
    "RecipeMismatchError",
    "current_versions",
    "fingerprint_from_bindings",
    "fingerprint_from_model",
    "fingerprint_of",
    "tensor_sha256",
]
