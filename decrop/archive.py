"""A ``torch.export`` archive (.pt2) checked before torch reads it: loading one must never run code.

``torch.export.load`` (torch 2.14, ``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde``) runs
code from the archive in more places than the graph. `load_export` reads the file's bytes once, `check_archive`
refuses (`ArchiveRefused`, naming the member) every member torch would turn into code while loading, and only then
are the same bytes handed to torch (no second read of the file that could see another one). Per member kind:

``data/sample_inputs/<m>.pt``, legacy ``data/weights/<m>.pt`` and ``data/constants/<m>.pt``
    ``torch.save`` files; torch reads them with ``weights_only=True`` and, when that fails, again with
    ``weights_only=False`` (a plain unpickler: any global, any call).
weights and tensor constants whose ``*_config.json`` entry says ``use_pickle``
    ``torch.save`` files read with ``weights_only=False``, whatever they hold.
    Every such file must be a ``torch.save`` zip (not the legacy stream format, not a TorchScript archive, which
    ``torch.load`` hands to ``torch.jit.load``) whose ``data.pkl`` uses only protocol-2 opcodes without object
    construction (no INST/OBJ/NEWOBJ/BUILD/EXT/STACK_GLOBAL) and imports only the globals that rebuild plain tensors
    (`ALLOWED_GLOBALS`): what a weights_only load accepts, narrowed; such a pickle can only call those.
``data/constants/custom_obj_*``
    TorchScript custom objects, read with ``torch._C._pickle_load_obj``: refused.
``data/constants/opaque_obj_*``
    opaque Python objects, read with plain ``pickle.loads``: refused.
``data/aotinductor/...``
    AOTInductor-compiled code: torch loads (dlopen) its shared libraries while loading the archive: refused.
``models/<m>.json`` (the program)
    JSON, but some of its strings become code: shape expressions (``expr_str``) go through ``sympy.sympify``, an
    ``eval``; node and value names, placeholder names, module paths and comments go into the Python source that
    torch.fx generates and ``exec``-s for the module; pytree specs (``in_spec``/``out_spec``) may name a module to
    import. Shape expressions must be sympy's ``srepr`` of integers, shape symbols and the functions torch's
    deserializer knows; names must be identifiers; pytree specs may use only tuple/list/dict/OrderedDict; string
    arguments of operators (written with ``repr``) are free; every other string may not hold quotes, backslashes
    or control characters (stack traces and JSON-valued metadata, which torch.fx writes into comments of its
    verbose listings: no line breaks other than ``\\n`` / none at all).
anything else
    refused unless it is a member torch.export.save writes for a program (``extra/*`` files are read as text).

The archive must also be unambiguous: every member in one top-level folder (a member outside it makes torch fall back
to its legacy loader, which unpickles with ``weights_only=False``), no member twice, not even differing only in
case (torch's zip reader finds members case-insensitively and takes the first copy, Python's zipfile the last).

What stays code: the program's graph itself runs when the model is called (operators of ``torch.ops``), so an
exported program is still code from whoever wrote it; these checks stop code that would run at load time through
pickles, ``eval`` and generated source, not a graph that computes something else than it claims.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

# Member names of torch 2.14's archive (torch/csrc/export/pt2_archive_constants.h).
MODELS_DIR, MODEL_SUFFIX = "models/", ".json"
SAMPLE_INPUTS = "data/sample_inputs/{}.pt"
WEIGHTS_DIR, CONSTANTS_DIR = "data/weights/", "data/constants/"
WEIGHTS_CONFIG, CONSTANTS_CONFIG = WEIGHTS_DIR + "{}_weights_config.json", CONSTANTS_DIR + "{}_constants_config.json"
TENSOR_CONSTANT, CUSTOM_OBJ, OPAQUE_OBJ = "tensor_", "custom_obj_", "opaque_obj_"
AOTI_DIR, EXTRA_DIR = "data/aotinductor/", "extra/"
HOUSEKEEPING = {"archive_format", "archive_version", "byteorder", "version", ".data/version",
                ".data/serialization_id", ".format_version", ".storage_alignment"}
_MODEL = r"[A-Za-z0-9_\-]+"
_KNOWN = re.compile(rf"models/{_MODEL}\.json|data/sample_inputs/{_MODEL}\.pt|data/weights/weight_\d+|"
                    rf"data/weights/{_MODEL}(_weights_config\.json|\.pt)|data/constants/tensor_\d+|"
                    rf"data/constants/{_MODEL}(_constants_config\.json|\.pt)")
# Members of a torch.save zip (``data/<key>`` holds a storage's raw bytes); ``constants.pkl`` or ``code/`` would make
# it a TorchScript archive, which torch.load passes to torch.jit.load.
_TORCH_SAVE = re.compile(r"data\.pkl|byteorder|version|\.data/version|\.data/serialization_id|\.format_version|"
                         r"\.storage_alignment|data/\d+")


def _storage_globals() -> set[str]:
    names = {f"{cls.__module__} {cls.__name__}" for cls in torch._storage_classes}
    return names | {f"torch {name}" for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


# What a pickle of plain tensors (torch.save, protocol 2) imports: a subset of torch's weights_only allow-list.
ALLOWED_GLOBALS = frozenset({"torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter",
                             "collections OrderedDict", "torch Size", "torch device"} | _storage_globals())
# Protocol-2 opcodes that build primitives, containers and allowed calls; nothing that constructs or mutates an
# arbitrary object (INST, OBJ, NEWOBJ, BUILD), looks a global up from the stack (STACK_GLOBAL) or the copyreg
# registry (EXT*), or reads protocol-0 text (whose GLOBAL-like opcodes we would have to parse ourselves).
ALLOWED_OPCODES = frozenset({
    "PROTO", "STOP", "MARK", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "SETITEM", "SETITEMS", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1",
    "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINSTRING", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    "GLOBAL", "REDUCE", "BINPERSID"})


class ArchiveRefused(Exception):
    """A member of an archive that torch would turn into code while loading it; the message names the member."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"its member {_show(member)} {reason}")
        self.member = member


def _show(text: str, limit: int = 80) -> str:
    """`text` as one printable line (a member name or string from the file could hold anything)."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text if text.isprintable() and text.isascii() and " " not in text else ascii(text)


def load_export(path: str | Path, extra_files: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """``torch.export.load`` of `path`, the file read once and `check_archive`-ed first (ArchiveRefused for an
    unsafe member, ValueError for an archive torch could not load as a program either)."""
    data = Path(path).read_bytes()
    check_archive(data)
    return torch.export.load(io.BytesIO(data), extra_files=extra_files)


def check_archive(data: bytes) -> None:
    """Refuse (ArchiveRefused) an archive with a member torch.export.load would run as code (module doc)."""
    records, reader = _records(data)
    models = []
    for name in records:
        if name in HOUSEKEEPING or name.startswith(EXTRA_DIR):
            continue
        if name.startswith(AOTI_DIR):
            raise ArchiveRefused(name, "is AOTInductor-compiled code, whose shared library torch.export.load "
                                       "loads (and so runs) while reading the archive")
        if name.startswith(CONSTANTS_DIR + CUSTOM_OBJ):
            raise ArchiveRefused(name, "is a TorchScript custom object, which torch.export.load unpickles with "
                                       "torch._C._pickle_load_obj (code of a registered class)")
        if name.startswith(CONSTANTS_DIR + OPAQUE_OBJ):
            raise ArchiveRefused(name, "is an opaque Python object, which torch.export.load reads with plain "
                                       "pickle.loads (an unpickler that can call any function)")
        if not _KNOWN.fullmatch(name):
            raise ArchiveRefused(name, "is not part of a torch.export program as torch.export.save writes it")
        if name.startswith(MODELS_DIR):
            models.append(name[len(MODELS_DIR):-len(MODEL_SUFFIX)])
        elif name.endswith(".pt"):  # sample inputs, legacy weights and constants: torch.load with a fallback
            check_torch_save(name, reader.get_record(name))
    if "archive_format" not in records or reader.get_record("archive_format") != b"pt2":
        raise ValueError("it is not a torch.export archive (no archive_format 'pt2')")
    for model in models:
        name = MODELS_DIR + model + MODEL_SUFFIX
        check_program_json(name, _json(reader, name))
        for legacy, config, folder in ((WEIGHTS_DIR + model + ".pt", WEIGHTS_CONFIG.format(model), WEIGHTS_DIR),
                                       (CONSTANTS_DIR + model + ".pt", CONSTANTS_CONFIG.format(model),
                                        CONSTANTS_DIR)):
            if legacy not in records and config in records:
                _check_payloads(reader, config, folder)


def _records(data: bytes) -> tuple[list[str], Any]:
    """The member names (without the archive's folder) as torch's reader lists them, and that reader; the
    archive refused where Python's zipfile and torch's reader could see different members."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError(f"it is not a zip archive ({err})") from None
    if not names:
        raise ValueError("it is an empty zip archive")
    folder = next((name.split("/", 1)[0] + "/" for name in names if "/" in name), "")
    seen: dict[str, str] = {}
    for name in names:
        if not folder or not name.startswith(folder):
            raise ArchiveRefused(name, f"lies outside the archive's folder {_show(folder)}, which makes "
                                       f"torch.export.load fall back to its legacy loader (weights_only=False)")
        if name.casefold() in seen:
            raise ArchiveRefused(name[len(folder):], "appears twice in the archive (names compared ignoring case, "
                                                     "as torch's zip reader does), so torch and a check could read "
                                                     "different copies")
        seen[name.casefold()] = name
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = list(reader.get_all_records())
    except Exception as err:
        raise ValueError(f"torch cannot read the archive ({type(err).__name__})") from None
    if sorted(records) != sorted(name[len(folder):] for name in names):
        raise ArchiveRefused(folder, "lists other members for torch's zip reader than for Python's zipfile")
    return records, reader


def _json(reader: Any, name: str) -> Any:
    try:
        return json.loads(reader.get_record(name).decode("utf-8"))  # as torch reads it
    except (RuntimeError, ValueError, RecursionError) as err:
        raise ValueError(f"its member {_show(name)} is not readable JSON ({type(err).__name__})") from None


def _check_payloads(reader: Any, config_name: str, folder: str) -> None:
    """The pickled weights/constants a payload config names (torch.load(weights_only=False) of each), and its
    entries that torch would read with another unpickler."""
    config = _json(reader, config_name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"its member {_show(config_name)} has no 'config' mapping")
    check_strings(config_name, config)
    for fqn, meta in entries.items():
        path_name = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(path_name, str):
            raise ValueError(f"its member {_show(config_name)} gives {_show(str(fqn))} no path_name")
        if folder == CONSTANTS_DIR and path_name.startswith((CUSTOM_OBJ, OPAQUE_OBJ)):
            raise ArchiveRefused(os.path.join(folder, path_name), "is a custom or opaque object, which "
                                 "torch.export.load unpickles with an unpickler that can call any function")
        if folder == CONSTANTS_DIR and not path_name.startswith(TENSOR_CONSTANT):
            raise ValueError(f"its member {_show(config_name)} names an unknown kind of constant "
                             f"{_show(path_name)}")
        if meta.get("use_pickle") is not False:  # torch: `if payload_meta.use_pickle:` -> weights_only=False
            member = os.path.join(folder, path_name)  # exactly the name torch asks its reader for
            try:
                blob = reader.get_record(member)
            except RuntimeError:
                raise ValueError(f"its member {_show(config_name)} names a missing member {_show(member)}") from None
            check_torch_save(member, blob)


# ------------------------------------------------------------------------------------------------ pickles

def check_torch_save(member: str, blob: bytes) -> None:
    """A ``torch.save`` file inside the archive: a zip of ``data.pkl`` (a pickle of plain tensors, `check_pickle`)
    and raw storages, nothing else."""
    if not blob.startswith(b"PK\x03\x04"):
        raise ArchiveRefused(member, "is not a torch.save zip file; torch.load would read it with its legacy "
                                     "unpickler, which can run code")
    try:
        inner = torch._C.PyTorchFileReader(io.BytesIO(blob))
        records = list(inner.get_all_records())
    except Exception as err:
        raise ArchiveRefused(member, f"is a zip file torch cannot read ({type(err).__name__})") from None
    if len({r.casefold() for r in records}) != len(records):
        raise ArchiveRefused(member, "holds a file twice (names compared ignoring case)")
    for record in records:
        if not _TORCH_SAVE.fullmatch(record):
            raise ArchiveRefused(member, f"holds {_show(record)}, which is no part of a torch.save file of tensors "
                                         f"(constants.pkl or code/ make torch.load run it as TorchScript)")
    if "data.pkl" not in records:
        raise ArchiveRefused(member, "holds no data.pkl")
    check_pickle(member, inner.get_record("data.pkl"))


def check_pickle(member: str, data: bytes) -> None:
    """A pickle that can only rebuild plain tensors, lists, tuples, dicts and numbers: `ALLOWED_OPCODES` only,
    globals from `ALLOWED_GLOBALS` only (read statically: nothing is unpickled)."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name not in ALLOWED_OPCODES:
                raise ArchiveRefused(member, f"is a pickle with opcode {op.name}, which a pickle of plain tensors "
                                             f"does not use (torch may unpickle it with weights_only=False)")
            if op.name == "GLOBAL" and arg not in ALLOWED_GLOBALS:
                raise ArchiveRefused(member, f"is a pickle that imports {_show(str(arg).replace(' ', '.'))}, which "
                                             f"torch.export.load would call while unpickling it (only plain "
                                             f"tensors are allowed)")
    except ArchiveRefused:
        raise
    except Exception as err:  # truncated or malformed stream
        raise ArchiveRefused(member, f"is not a valid pickle ({type(err).__name__})") from None


# --------------------------------------------------------------------------------------- the program JSON

_UNSAFE_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029'\"`\\]")
_UNSAFE_META = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\"\\]")
_UNSAFE_TRACE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # \t and \n allowed
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAME_KEYS = {"name", "as_name", "forward_arg_names"}  # become Python identifiers in torch.fx's generated code
_NAME_TABLES = {"tensor_values", "sym_int_values", "sym_float_values", "sym_bool_values", "custom_obj_values"}
_META_TEXT = {"nn_module_stack", "torch_fn", "source_fn_stack"}
_JSON_TEXT = {"custom", "from_node"}  # JSON inside a string, decoded into node.meta (custom: into comments)
_STRING_FIELDS = (_NAME_KEYS - {"forward_arg_names"}) | _META_TEXT | _JSON_TEXT | {
    "expr_str", "in_spec", "out_spec", "stack_trace", "target", "fqn", "path_name", "parameter_name", "buffer_name",
    "tensor_constant_name", "custom_obj_name", "user_input_name"}
_TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}

# sympy.printing.repr.srepr of torch's shape expressions: sympy classes and torch.utils._sympy.functions (the
# names the deserializer hands to sympify), shape symbols as string arguments, integers and floats.
_SYMPY_FUNCTIONS = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "floor", "ceiling", "Abs",
    "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity"}
_SYMPY_CONSTANTS = {"True", "False", "true", "false", "oo", "zoo", "nan"}
_SYMPY_KEYWORDS = {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero",
                   "zero", "even", "odd", "rational", "extended_real", "commutative", "precision"}
_SYMPY_TOKEN = re.compile(r"\s+|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>[0-9]{1,40})|'(?P<string>[^'\\]*)'|"
                          r"(?P<op>==|[(),=\-])")
_SYMPY_STRING = re.compile(r"[a-z]+[a-z0-9_]*[0-9]+|-?[0-9]+(\.[0-9]*)?(e[-+]?[0-9]+)?")


def check_program_json(member: str, program: Any) -> None:
    """Every string of a serialized program that torch would evaluate, import or paste into generated source."""
    check_strings(member, program)


def check_strings(member: str, tree: Any) -> None:
    """Every string of `tree` (parsed JSON) by the rule of the key it is under (`_string_problem`); the fields
    whose text reaches code must be strings (torch does not check the types of a program's JSON)."""
    try:
        for key, value in _fields(tree):
            if key in _STRING_FIELDS and not (value is None or isinstance(value, str)) or (
                    key == "forward_arg_names" and not (value is None or isinstance(value, list)
                                                        and all(isinstance(v, str) for v in value))):
                raise ArchiveRefused(member, f"holds {_show(key)} of type {type(value).__name__}, not a string")
        for key, value, is_key in _strings(tree, None):
            reason = _string_problem(key, value, is_key)
            if reason:
                raise ArchiveRefused(member, f"holds {_show(key or 'a key')} {ascii(value[:60])}: {reason}")
    except RecursionError:
        raise ArchiveRefused(member, "nests its JSON too deeply") from None


def _fields(tree: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) of every dict item in `tree`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield from ((k, v) for k, v in node.items() if isinstance(k, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _strings(tree: Any, key: str | None, table: bool = False) -> Iterator[tuple[str | None, str, bool]]:
    """(key, string, is a dict key) of every string in `tree`; `key`: the dict key it is (in a list) under."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield (key if table else None), k, True
            yield from _strings(v, k, k in _NAME_TABLES)
    elif isinstance(tree, list):
        for v in tree:
            yield from _strings(v, key)
    elif isinstance(tree, str):
        yield key, tree, False


def _string_problem(key: str | None, value: str, is_key: bool) -> str | None:
    if is_key:
        if key in _NAME_TABLES and not value.isidentifier():
            return "a value name must be a Python identifier (torch.fx pastes it into generated code)"
        return "dict keys may not hold quotes, backslashes or control characters" if _UNSAFE_CHAR.search(
            value) else None
    if key in ("as_string", "as_strings"):  # operator arguments: torch.fx writes them with repr()
        return None
    if key in _NAME_KEYS:
        ok = value.isidentifier() or (value == "" and key == "name")
        return None if ok else "a name must be a Python identifier (torch.fx pastes it into generated code)"
    if key == "expr_str":
        return _sympy_problem(value)
    if key in ("in_spec", "out_spec"):
        return _treespec_problem(value)
    if key == "stack_trace":
        return "a stack trace may hold no control characters but tabs and newlines (it becomes a comment in " \
               "generated code)" if _UNSAFE_TRACE.search(value) else None
    if key in _JSON_TEXT:
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return "not JSON"
        bad = [s for _, s, _ in _strings(decoded, None) if _CONTROL.search(s)]
        return "metadata may hold no control characters (it becomes a comment in generated code)" if bad else None
    if key in _META_TEXT:
        return "module metadata may hold no double quotes, backslashes or control characters" if _UNSAFE_META.search(
            value) else None
    return "strings of a program may not hold quotes, backslashes or control characters" if _UNSAFE_CHAR.search(
        value) else None


def _sympy_problem(expr: str) -> str | None:
    """Why `expr` is not sympy's srepr of a shape expression (sympify evaluates it with eval)."""
    bad = "not a shape expression of integers, shape symbols and sympy functions (torch evaluates it with eval)"
    if len(expr) > 20_000:
        return bad
    tokens, pos = [], 0
    while pos < len(expr):
        match = _SYMPY_TOKEN.match(expr, pos)
        if not match:
            return bad
        pos = match.end()
        if match.lastgroup:
            tokens.append((match.lastgroup, match.group(match.lastgroup)))
    depth = 0
    for i, (kind, text) in enumerate(tokens):
        after = tokens[i + 1][1] if i + 1 < len(tokens) else None
        before = tokens[i - 1][1] if i else None
        if kind == "name":
            if after == "(":
                ok = text in _SYMPY_FUNCTIONS
            elif after == "=":
                ok = text in _SYMPY_KEYWORDS and before in ("(", ",")
            else:
                ok = text in _SYMPY_CONSTANTS
            if not ok:
                return bad
        elif kind == "string" and not _SYMPY_STRING.fullmatch(text):
            return bad
        elif text == "(":
            depth += 1
            if before is None or tokens[i - 1][0] != "name":
                return bad  # only calls of the names above: no tuples, no generator expressions
        elif text == ")":
            depth -= 1
            if depth < 0:
                return bad
        elif text == "==":
            return bad
    return None if depth == 0 else bad


def _treespec_problem(spec: str) -> str | None:
    """Why `spec` (pytree.treespec_dumps) is not a spec of tuples, lists and dicts of tensors: other node types
    and enum contexts make torch import modules by name."""
    bad = "a pytree spec may only use tuple, list, dict and OrderedDict nodes with plain keys"
    try:
        protocol, root = json.loads(spec)
    except (ValueError, TypeError, RecursionError):
        return bad
    if protocol != 1:
        return bad
    stack = [root]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            return bad
        if node["type"] not in _TREESPEC_TYPES or not isinstance(node["children_spec"], list):
            return bad
        context = node["context"]
        if context is not None:
            try:
                decoded = json.loads(context) if isinstance(context, str) else {}
            except (ValueError, RecursionError):
                return bad
            if not _plain_json(decoded):
                return bad
        stack.extend(node["children_spec"])
    return None


def _plain_json(value: Any) -> bool:
    """None, numbers, and strings without quotes or control characters, in lists (no dicts: enum hooks)."""
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    if isinstance(value, str):
        return not _UNSAFE_CHAR.search(value)
    return value is None or isinstance(value, (bool, int, float))
