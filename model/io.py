"""The model directory: ``model.json`` plus ``members/member-<i>.safetensors`` and, when the model
has them, its forward model ``forward/forward.safetensors`` (model/forward.py), ``ood.safetensors``
(the embedding reference of the out-of-distribution score, ``model/ood.py``) and
``refine/reference.safetensors`` (the noise-free reference spectra of the label refinement,
``model/refine.py``), nothing else.

``model.json`` holds everything needed to use and to trust the weights: the setup (grids), the
architecture, the label scaling with training ranges, each member's weight file with its sha256,
the training provenance and metrics (``Ensemble.info``), the speclabel version and a ``model_id``:
the first 16 hex digits of the sha256 of model.json's canonical content without ``model_id``.
Because that content includes every weight file's sha256, the id covers the weights too.

Loading checks, in order, and fails with :class:`IntegrityError` naming the check: the format, the
``model_id`` against the content (an edited model.json), the set of files in ``members/`` (a stray
or missing weight file), each file's sha256 (a tampered or truncated file), each file's tensors
against the architecture, the forward model's sha256, labels and arms, the embedding reference
(listed under ``ood`` with its sha256; a model without one loads with ``Ensemble.ood = None``), the
reference spectra (under ``refine``, likewise, against the labels and the grid) and,
when the caller names the setup of its input, the wavelength grid.
Weights are safetensors only: nothing here can execute code from a model directory.

Saving is atomic: on a local disk the directory is staged beside the target and renamed into
place; on an object store the weight files are written first and model.json last, and a reader
never trusts weights that model.json does not vouch for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from importlib.metadata import PackageNotFoundError, version

import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy_safetensors
from safetensors.numpy import save as save_numpy_safetensors
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from speclabel.core.errors import ConfigError, IntegrityError, SpeclabelError
from speclabel.core.setups import Setup
from speclabel.core.storage import exists, files_under, filesystem_and_path, join, write_folder_atomic

from .arch import ArchConfig, build_network
from .ensemble import STD_DDOF, Ensemble
from .forward import ForwardModel
from .ood import EmbeddingReference
from .refine import Refinement
from .scaling import LabelScaler

MODEL_JSON = "model.json"
MEMBERS_DIR = "members"
FORWARD_FILE = "forward/forward.safetensors"  # the data-driven forward model (model/forward.py)
OOD_FILE = "ood.safetensors"
REFINE_FILE = "refine/reference.safetensors"  # the refinement's reference spectra (model/refine.py)
FORMAT = "speclabel-model"
FORMAT_VERSION = 1
# Sections of model.json written from the ensemble itself; Ensemble.info adds the others.
RESERVED = (
    "format",
    "format_version",
    "model_id",
    "speclabel_version",
    "created_at",
    "labels",
    "setup",
    "arch",
    "scaling",
    "std_ddof",
    "members",
    "forward",
    "ood",
    "refine",
)


def speclabel_version() -> str:
    try:
        return version("speclabel")
    except PackageNotFoundError:
        return "unknown"


def member_file(index: int) -> str:
    return f"{MEMBERS_DIR}/member-{index}.safetensors"


def canonical_bytes(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def compute_model_id(document: dict) -> str:
    content = {k: v for k, v in document.items() if k != "model_id"}
    return hashlib.sha256(canonical_bytes(content)).hexdigest()[:16]


def json_numbers(value):
    """``value`` with every non-finite float replaced by None: JSON has no NaN, and a metric that is
    undefined (the scatter of a single test row, a validation split with no rows) is written as null."""
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_numbers(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def member_bytes(network: torch.nn.Module, index: int) -> bytes:
    # float32 on disk whatever the network computed in; contiguous copies (safetensors refuses views).
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in network.state_dict().items()}
    return save_safetensors(state, metadata={"format": "pt", "speclabel_member": str(index)})


def model_document(ensemble: Ensemble, weight_files: dict[str, bytes]) -> dict:
    clash = sorted(set(ensemble.info) & set(RESERVED))
    if clash:
        raise ConfigError(f"Ensemble.info may not set the reserved model.json section(s) {clash}")
    members = []
    for index, info in enumerate(ensemble.member_info):
        name = member_file(index)
        members.append(
            {**json_numbers(info), "file": name, "sha256": hashlib.sha256(weight_files[name]).hexdigest()}
        )
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "speclabel_version": speclabel_version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "labels": list(ensemble.label_names),
        "setup": ensemble.setup.to_dict(),
        "arch": ensemble.arch.to_dict(),
        "scaling": ensemble.scaler.to_dict(),
        "std_ddof": STD_DDOF,
        "members": members,
        **json_numbers(ensemble.info),
    }
    if ensemble.forward is not None:
        document["forward"] = {
            **json_numbers(ensemble.forward.summary()),
            "file": FORWARD_FILE,
            "sha256": hashlib.sha256(weight_files[FORWARD_FILE]).hexdigest(),
        }
    if ensemble.ood is not None:
        document["ood"] = {
            **ensemble.ood.describe(),
            "file": OOD_FILE,
            "sha256": hashlib.sha256(weight_files[OOD_FILE]).hexdigest(),
        }
    if ensemble.refinement is not None:
        document["refine"] = {
            **json_numbers(ensemble.refinement.describe()),
            "file": REFINE_FILE,
            "sha256": hashlib.sha256(weight_files[REFINE_FILE]).hexdigest(),
        }
    document["model_id"] = compute_model_id(document)
    return document


def save_model(ensemble: Ensemble, location: str, *, overwrite: bool = False) -> str:
    """Write the ensemble as a model directory at a local path or URI; returns its ``model_id``."""
    weight_files = {member_file(i): member_bytes(net, i) for i, net in enumerate(ensemble.networks)}
    if ensemble.forward is not None:
        weight_files[FORWARD_FILE] = ensemble.forward.to_bytes()
    if ensemble.ood is not None:
        weight_files[OOD_FILE] = save_numpy_safetensors(ensemble.ood.tensors(), metadata={"format": "np"})
    if ensemble.refinement is not None:
        weight_files[REFINE_FILE] = save_numpy_safetensors(
            ensemble.refinement.tensors(), metadata={"format": "np"}
        )
    document = model_document(ensemble, weight_files)
    text = (json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    fs, root = filesystem_and_path(location)
    root = root.rstrip("/")
    if exists(fs, join(root, MODEL_JSON)) and not overwrite:
        raise SpeclabelError(f"a model already exists at {location}; choose another path or overwrite it")
    # model.json last: on an object store it is the commit point, written after the weights it vouches for.
    write_folder_atomic(location, {**weight_files, MODEL_JSON: text})
    ensemble.info = {k: v for k, v in document.items() if k not in RESERVED}
    ensemble.model_id = document["model_id"]
    return document["model_id"]


def read_model_document(location: str) -> dict:
    """model.json, checked against its own ``model_id`` (no weights read)."""
    fs, root = filesystem_and_path(location)
    path = join(root.rstrip("/"), MODEL_JSON)
    if not exists(fs, path):
        raise IntegrityError(
            f"check 'model.json present': no {MODEL_JSON} in {location}; is this a model directory?"
        )
    try:
        with fs.open_input_stream(path) as fh:
            document = json.loads(fh.read().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(
            f"check 'model.json readable': {location}/{MODEL_JSON} is not valid JSON: {exc}"
        ) from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise IntegrityError(f"check 'format': {location}/{MODEL_JSON} is not a {FORMAT} document")
    if document.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(
            f"check 'format version': {location} has model format {document.get('format_version')}, "
            f"this speclabel ({speclabel_version()}) reads version {FORMAT_VERSION}"
        )
    expected = compute_model_id(document)
    if document.get("model_id") != expected:
        raise IntegrityError(
            f"check 'model_id': the content of {location}/{MODEL_JSON} does not match its model_id "
            f"{document.get('model_id')!r} (content hashes to {expected!r}): edited after it was written"
        )
    return document


def load_model(location: str, *, setup: Setup | None = None, dtype: torch.dtype = torch.float32) -> Ensemble:
    """Load and verify a model directory. ``setup``: the setup of the input the model will label."""
    document = read_model_document(location)
    model_setup = Setup.from_dict(document["setup"])
    if setup is not None and not model_setup.same_grid(setup):
        raise IntegrityError(
            f"check 'setup': model {document['model_id']} at {location} was trained on setup "
            f"{model_setup.name!r} ({_grid_text(model_setup)}), but the input uses setup {setup.name!r} "
            f"({_grid_text(setup)})"
        )
    arch = ArchConfig.from_dict(document["arch"])
    scaler = LabelScaler.from_dict(document["scaling"])
    fs, root = filesystem_and_path(location)
    root = root.rstrip("/")
    listed = [m["file"] for m in document["members"]]
    present = _member_files(fs, join(root, MEMBERS_DIR))
    if sorted(present) != sorted(listed):
        raise IntegrityError(
            f"check 'member files': {location}/{MEMBERS_DIR} holds {sorted(present)}, model.json lists "
            f"{sorted(listed)}"
        )
    networks = []
    for member in document["members"]:
        with fs.open_input_stream(join(root, member["file"])) as fh:
            data = fh.read()
        if hashlib.sha256(data).hexdigest() != member["sha256"]:
            raise IntegrityError(
                f"check 'weight sha256': {location}/{member['file']} does not match the sha256 in model.json "
                "(the file was changed or truncated)"
            )
        network = build_network(arch, model_setup)
        try:
            state = load_safetensors(data)
            network.load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError) as exc:
            raise IntegrityError(
                f"check 'weights fit architecture': {location}/{member['file']} does not fit "
                f"architecture {arch.name!r}: {exc}"
            ) from exc
        networks.append(network.to(dtype))
    ensemble = Ensemble(
        model_setup,
        arch,
        scaler,
        networks,
        member_info=[
            {k: v for k, v in m.items() if k not in ("file", "sha256")} for m in document["members"]
        ],
        info={k: v for k, v in document.items() if k not in RESERVED},
    )
    ensemble.forward = _load_forward(fs, root, location, document, ensemble)
    if "ood" in document:
        ensemble.ood = _load_ood(fs, root, location, document["ood"], ensemble)
    if "refine" in document:
        ensemble.refinement = _load_refinement(fs, root, location, document["refine"], ensemble)
    ensemble.model_id = document["model_id"]
    return ensemble


def _listed_file(fs, root: str, location: str, entry: dict, what: str) -> bytes:
    """The bytes of a file model.json lists beside the members (``entry``: its ``file`` and
    ``sha256``), checked to exist and to match its sha256 as the members are."""
    path = join(root, entry["file"])
    if not exists(fs, path):
        raise IntegrityError(f"check '{what} file': model.json lists {entry['file']}, absent in {location}")
    with fs.open_input_stream(path) as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IntegrityError(
            f"check '{what} sha256': {location}/{entry['file']} does not match the sha256 in "
            "model.json (the file was changed or truncated)"
        )
    return data


def _load_forward(fs, root: str, location: str, document: dict, ensemble: Ensemble) -> ForwardModel | None:
    """The forward model model.json lists, checked like the members; None for a model without one."""
    entry = document.get("forward")
    if entry is None:
        return None
    data = _listed_file(fs, root, location, entry, "forward model")
    forward = ForwardModel.from_bytes(data, f"{location}/{entry['file']}")
    arms = tuple((a.name, a.n_pixels) for a in ensemble.setup.arms)
    modelled = tuple(zip(forward.arm_names, forward.arm_pixels, strict=True))
    if forward.label_names != ensemble.label_names or modelled != arms:
        raise IntegrityError(
            f"check 'forward model fits': {location}/{entry['file']} models labels {forward.label_names} "
            f"on arms {forward.arm_names}, the ensemble has {ensemble.label_names} on {arms}"
        )
    return forward


def _listed_arrays(fs, root: str, location: str, section: dict, what: str) -> dict:
    """The numpy arrays of a safetensors file model.json lists (:func:`_listed_file`'s checks)."""
    data = _listed_file(fs, root, location, section, what)
    try:
        return load_numpy_safetensors(data)
    except SafetensorError as exc:
        raise IntegrityError(f"check '{what}': {location}/{section['file']} is unreadable: {exc}") from exc


def _load_ood(fs, root: str, location: str, section: dict, ensemble: Ensemble) -> EmbeddingReference:
    """The embedding reference model.json lists, checked by its sha256 and against the members."""
    tensors = _listed_arrays(fs, root, location, section, "ood reference")
    reference = EmbeddingReference.from_stored(tensors, section)
    width = ensemble.n_members * ensemble.arch.embedding_units(ensemble.setup)
    if reference.width != width:
        raise IntegrityError(
            f"check 'ood reference': {location}/{section['file']} expects embeddings of {reference.width} "
            f"features, the members give {width}"
        )
    return reference


def _load_refinement(fs, root: str, location: str, section: dict, ensemble: Ensemble) -> Refinement:
    """The reference spectra model.json lists, checked by their sha256 and against the labels."""
    tensors = _listed_arrays(fs, root, location, section, "reference spectra")
    if tuple(section.get("labels", ())) != ensemble.label_names:
        raise IntegrityError(
            f"check 'reference spectra': {location}/{section['file']} has labels {section.get('labels')}, "
            f"the ensemble {ensemble.label_names}"
        )
    return Refinement.from_stored(tensors, section, ensemble.setup)


def _member_files(fs, folder: str) -> list[str]:
    return [f"{MEMBERS_DIR}/{path[len(folder) + 1 :]}" for path in files_under(fs, folder)]


def _grid_text(setup: Setup) -> str:
    return ", ".join(f"{a.name} {a.wave_start:g}+{a.wave_step:g}x{a.n_pixels}" for a in setup.arms)
