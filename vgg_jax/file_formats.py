"""What a weights file is, read from its bytes alone (nothing is unpickled or loaded).

`describe(path)` names the container: HDF5 (Keras `.h5` / `.weights.h5`), a
Keras 3 `.keras` zip (which holds `model.weights.h5`), a PyTorch zip or legacy
`torch.save` file, safetensors, or something else. `pickle_globals(path)`
lists the `module.name` globals a PyTorch file's pickle would import, from its
opcodes (`pickletools.genops`): a tensor file needs only torch's rebuild
functions and storage types, so anything else means the file holds code.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (pre-1.6) format, which torchvision's VGG downloads still use:
# a pickled magic number (protocol 2, LONG1 0x1950a86a20f9469cfc6c).
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
KERAS_WEIGHTS_MEMBER = "model.weights.h5"

# What each container is called in messages, and the formats vgg_jax reads.
KINDS = {
    "hdf5": "an HDF5 file (Keras .h5 / .weights.h5)",
    "keras_zip": "a Keras 3 .keras archive",
    "torch_zip": "a PyTorch checkpoint (torch.save zip)",
    "torch_legacy": "a legacy PyTorch checkpoint (torch.save, pre-1.6)",
    "safetensors": "a safetensors file",
}
READ_FORMATS = (
    "torchvision: .pth/.pt (torch.save, zip or legacy) and .safetensors",
    "keras: .h5 (legacy and full-model), .weights.h5 and .keras archives",
)
# The only globals a plain state dict of tensors needs (torch.load's weights_only set).
_TENSOR_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device")}
_TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"}


def describe(path: str) -> str:
    """'hdf5', 'keras_zip', 'torch_zip', 'torch_legacy', 'safetensors' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(LEGACY_TORCH_MAGIC):
        return "torch_legacy"
    if looks_like_safetensors(head):
        return "safetensors"
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
        except zipfile.BadZipFile:  # truncated: its reader names the damage
            return "keras_zip" if path.endswith(".keras") else "torch_zip"
        if KERAS_WEIGHTS_MEMBER in members:
            return "keras_zip"
        if any(m.endswith("/data.pkl") or m == "data.pkl" for m in members):
            return "torch_zip"
    return "unknown"


def looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len < 100_000_000 and head[8:9] == b"{"


def keras_weights_bytes(path: str) -> io.BytesIO:
    """The `model.weights.h5` inside a `.keras` archive, in memory (h5py reads file objects)."""
    with zipfile.ZipFile(path) as z:
        return io.BytesIO(z.read(KERAS_WEIGHTS_MEMBER))


def pickle_globals(path: str) -> list[str]:
    """Every `module.name` the file's pickle(s) would import, in order, without unpickling."""
    kind = describe(path)
    if kind == "torch_zip":
        try:
            with zipfile.ZipFile(path) as z:
                name = next(m for m in z.namelist() if m.endswith("data.pkl"))
                return list(_globals(io.BytesIO(z.read(name)), pickles=1))
        except (zipfile.BadZipFile, OSError):  # damaged: torch.load names that
            return []
    if kind == "torch_legacy":
        # magic number, protocol, system info, the object, its storage keys; then raw bytes.
        with open(path, "rb") as f:
            return list(_globals(f, pickles=5))
    return []


def code_globals(path: str) -> list[str]:
    """The globals of `pickle_globals` that a file of tensors has no business importing."""
    return [g for g in pickle_globals(path) if not _is_tensor_global(*g.rsplit(".", 1))]


def _is_tensor_global(module: str, name: str) -> bool:
    if (module, name) in _TENSOR_GLOBALS:
        return True
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    if module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES):
        return True
    return False


def _globals(stream: io.IOBase, pickles: int) -> Iterator[str]:
    """`module.name` of each GLOBAL / STACK_GLOBAL / INST opcode of the next `pickles` pickles."""
    for _ in range(pickles):
        strings: list[str] = []  # the string pushes STACK_GLOBAL takes its two operands from
        memo: dict[int, str] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    yield str(arg).replace(" ", ".", 1)
                elif name == "STACK_GLOBAL":
                    yield ".".join(strings[-2:]) if len(strings) >= 2 else "<computed global>"
                elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                    strings.append(arg)
                elif name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg)] = strings[-1]
                elif name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(int(arg), "?"))
        except ValueError:  # truncated or not a pickle: torch.load reports it later
            return
