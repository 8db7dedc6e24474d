"""Embedders chosen by name: ``pca``, ``precomputed:KEY``, ``uce``, ``scvi`` and any third-party plug-in.

Embedders register through the entry-point group :data:`ENTRY_POINT_GROUP` (``scatlas.embedders``): name ->
``"module:Class"`` (a subclass of :class:`~atlas.embed.base.Embedder` whose ``name`` is that name). scatlas' own
embedders register there too (pyproject.toml); :data:`_BACKENDS` is the same table, the fallback when scatlas'
package metadata is not installed (a checkout on ``sys.path``). A name scatlas itself provides cannot be taken by
another package; two packages claiming one name: the first found wins, with a warning.

Nothing is imported until an embedder is used: listing names reads package metadata only, and a plug-in that fails
to import raises :class:`~atlas.errors.DependencyError` naming the plug-in and its package. Backends import heavy
packages lazily. docs/embedders.md ("Writing an embedder") shows a plug-in.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from scatlas.atlas.embed.base import EMBEDDER_FILE, Embedder
from scatlas.atlas.errors import DependencyError, InputError, StoreError
from scatlas.atlas.validate import escaped

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "scatlas.embedders"
"""The entry-point group third-party packages register embedders in (``name = "module:Class"``)."""
OWN_DISTRIBUTION = "scatlas"

# The built-in table: name -> "module:Class"; modules are imported only when the embedder is used. The same names
# are registered under ENTRY_POINT_GROUP in pyproject.toml; this table is the fallback without package metadata.
_BACKENDS: dict[str, str] = {
    "pca": "scatlas.atlas.embed.pca:PCAEmbedder",
    "precomputed": "scatlas.atlas.embed.precomputed:PrecomputedEmbedder",
    "uce": "scatlas.atlas.embed.uce:UCEEmbedder",
    "scvi": "scatlas.atlas.embed.scvi:SCVIEmbedder",
}

_SPEC_OPTIONS: dict[str, str] = {"precomputed": "key"}
"""Built-in embedders whose spec takes a ``:ARG`` (``precomputed:KEY``) and the option it fills. A plug-in class
declares its own as the class attribute ``spec_option``."""

_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
"""What an embedder name may be: lower case, no ':' (it separates the spec's argument), at most 64 characters."""


@dataclass(frozen=True)
class EmbedderEntry:
    """One registered embedder: its ``name``, the ``target`` ``"module:Class"``, and where it comes from
    (``origin``: ``"scatlas"`` for the built-in ones, else ``"<distribution> <version>"``)."""

    name: str
    target: str
    origin: str
    builtin: bool

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def load(self) -> type[Embedder]:
        """Import the module and return the class; DependencyError (naming the plug-in) when that fails or the
        object is not an :class:`Embedder` registered under its own name."""
        module_name, _, attr = self.target.partition(":")
        what = (f"the embedder {self.name!r} ({self.target})" if self.builtin
                else f"the embedder plug-in {self.name!r} ({self.target}, from {self.origin})")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # an import error, or anything the module raises while importing
            hint = ("reinstall scatlas, or install the extra it needs" if self.builtin
                    else f"reinstall or fix {self.origin.split(' ')[0]}, or uninstall it")
            text = " ".join(str(exc).split())
            text = text if len(text) <= 300 else text[:300] + "..."
            raise DependencyError(f"{what} failed to import: {type(exc).__name__}: {text}; {hint}") from exc
        if not (isinstance(obj, type) and issubclass(obj, Embedder)):
            raise DependencyError(f"{what} is not a subclass of scatlas' Embedder (got {escaped(repr(obj), 80)})")
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
            raise DependencyError(f"{what} does not implement the Embedder methods {missing}")
        declared = getattr(obj, "name", None)
        if declared != self.name:
            raise DependencyError(
                f"{what} declares name = {escaped(declared, 60)}; it must be {self.name!r}, the name it is "
                "registered under (an index records the class' name to load its embedder again)"
            )
        return obj

    def fits(self, cls: type[Embedder]) -> bool:
        """Whether the class fits on an atlas sample (overrides :meth:`Embedder.fit`)."""
        return cls.fit is not Embedder.fit

    def spec_option(self, cls: type[Embedder]) -> str | None:
        """The option a ``NAME:ARG`` spec fills with ARG (None: the spec takes no argument)."""
        return _SPEC_OPTIONS.get(self.name) if self.builtin else getattr(cls, "spec_option", None)


def _origin(ep: metadata.EntryPoint) -> tuple[str, str]:
    """(distribution name, "name version") of the package that declares ``ep``."""
    dist = getattr(ep, "dist", None)
    name = str(getattr(dist, "name", None) or "unknown package")
    version = str(getattr(dist, "version", None) or "")
    return name, f"{name} {version}".strip()


@functools.cache
def registered_embedders() -> dict[str, EmbedderEntry]:
    """Every registered embedder by name: scatlas' own (its entry points, else :data:`_BACKENDS`), then those of
    other packages in the entry-point group. Reads package metadata only (cached; :func:`clear_registry_cache`)."""
    own: dict[str, EmbedderEntry] = {}
    others: list[tuple[metadata.EntryPoint, str]] = []
    try:
        points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # broken metadata of some installed package: keep the built-in ones usable
        logger.warning("cannot read the %s entry points (%s: %s); only the built-in embedders are available",
                       ENTRY_POINT_GROUP, type(exc).__name__, exc)
        points = []
    for ep in points:
        dist, origin = _origin(ep)
        if dist.lower() == OWN_DISTRIBUTION:
            own[ep.name] = EmbedderEntry(ep.name, ep.value, OWN_DISTRIBUTION, True)
        else:
            others.append((ep, origin))
    entries = {name: EmbedderEntry(name, target, OWN_DISTRIBUTION, True) for name, target in _BACKENDS.items()}
    entries.update(own)
    for ep, origin in others:
        name = ep.name
        if not _NAME.match(name) or ":" not in ep.value:
            logger.warning("ignoring the embedder plug-in %r of %s: the name must be lower case without ':' and "
                           "the target 'module:Class' (got %r)", name, origin, ep.value)
            continue
        if name in entries:
            taken = entries[name]
            if taken.target != ep.value or taken.origin != origin:
                logger.warning("ignoring the embedder plug-in %r of %s (%s): the name is taken by %s (%s)",
                               name, origin, ep.value, taken.origin, taken.target)
            continue
        entries[name] = EmbedderEntry(name, ep.value, origin, False)
    return dict(sorted(entries.items()))


def clear_registry_cache() -> None:
    """Forget the registered embedders read so far (after installing or removing a plug-in in this process)."""
    registered_embedders.cache_clear()


def available_embedders() -> list[str]:
    """Names of the registered embedders (``precomputed`` is asked for as ``precomputed:KEY``)."""
    return sorted(registered_embedders())


def _choices() -> str:
    names = [f"{n}:KEY" if n in _SPEC_OPTIONS else n for n in available_embedders()]
    return ", ".join(names)


def embedder_entry(name: str) -> EmbedderEntry:
    """The registered embedder ``name``; InputError listing the registered ones when there is none."""
    entry = registered_embedders().get(name)
    if entry is None:
        raise InputError(
            f"unknown embedder {escaped(name, 60)}; choose one of: {_choices()} (`scatlas embedders` lists them "
            "with where each comes from)"
        )
    return entry


def _backend(name: str) -> type[Embedder]:
    return embedder_entry(name).load()


def make_embedder(spec: str, **options: Any) -> Embedder:
    """Create an (unfitted) embedder from a spec such as ``"pca"``, ``"precomputed:X_uce"`` or a plug-in's name."""
    name, _, arg = spec.partition(":")
    entry = embedder_entry(name)
    cls = entry.load()
    arg_option = entry.spec_option(cls)
    if arg_option is not None:
        if not arg:
            raise InputError(
                f"the {name} embedder needs an argument: --embedder {name}:{arg_option.upper()}"
                + (" (an obsm key)" if name == "precomputed" else "")
            )
        options = {arg_option: arg, **options}
    elif arg:
        raise InputError(f"embedder {name!r} takes no ':' argument (got {escaped(spec, 80)})")
    signature = inspect.signature(cls)
    accepted = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        raise InputError(
            f"embedder {name!r} has no option(s) {', '.join(escaped(u, 40) for u in unknown)}; it takes: "
            f"{', '.join(accepted) or 'none'}"
        )
    return cls(**options)


def load_embedder(directory: str | Path) -> Embedder:
    """Load an embedder saved with :meth:`Embedder.save` and check its fingerprint."""
    directory = Path(directory)
    meta_path = directory / EMBEDDER_FILE
    if not meta_path.is_file():
        raise StoreError(f"no embedder at {directory} ({EMBEDDER_FILE} missing); rebuild the index")
    meta = json.loads(meta_path.read_text())
    name = meta["name"]
    if name not in registered_embedders():
        raise DependencyError(
            f"the embedder at {directory} is {escaped(name, 60)}, which is not registered here (registered: "
            f"{', '.join(available_embedders())}): install the package that provides it"
        )
    embedder = _backend(name)._load(directory, meta["params"])
    if embedder.fingerprint() != meta["fingerprint"]:
        raise StoreError(
            f"embedder at {directory} does not match its recorded fingerprint "
            f"({embedder.fingerprint()} != {meta['fingerprint']}): the artefact was modified; rebuild the index"
        )
    return embedder
