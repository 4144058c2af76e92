"""The pass contract and the pipeline that runs passes in a checked order.

A pass is a small class with a ``name`` (the dump file name), a ``requires`` tuple of the
passes that must run before it, and ``call(gm) -> PassResult``. ``modified`` is True only
when the graph changed. The :class:`PassManager` checks ``requires`` when it is built,
lints the graph after every pass (and recompiles it once at the end), and writes the dumps (see
:mod:`qgraph.core.dump`) when a dump directory is given or ``QGRAPH_DUMP`` is set. Passes print
nothing; all debugging output belongs here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import networkx as nx
import torch.fx

from qgraph.core.errors import PassError, PassOrderError, QGraphError
from qgraph.core.gc_pause import gc_paused


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


class Pass:
    """Base of every qgraph pass. Subclasses set ``name`` and implement :meth:`call`."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[type["Pass"], ...]] = ()

    def call(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return self.call(gm)


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    nodes: int


@dataclass
class PassManager:
    """Runs ``passes`` in order; ``dump_dir`` (or env ``QGRAPH_DUMP``) turns on dumps.

    ``stage`` prefixes dump names so that the prepare and convert pipelines can share a
    directory: ``prepare/003_annotate.txt``.
    """

    passes: Sequence[Pass]
    dump_dir: str | os.PathLike | None = None
    stage: str = "prepare"
    history: list[PassRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.check_order(self.passes)
        if self.dump_dir is None and os.environ.get("QGRAPH_DUMP"):
            self.dump_dir = os.environ["QGRAPH_DUMP"]

    @staticmethod
    def check_order(passes: Sequence[Pass]) -> None:
        """Raise :class:`PassOrderError` unless every pass's ``requires`` is met, in order.

        The ``requires`` of the pipeline's passes, followed transitively, form a directed graph
        of pass types (an edge ``P → R``: P requires R). It must be acyclic: a cycle is an
        error that names it, since no order runs each of its passes after the others. Every
        type a pipeline pass requires must be in the pipeline, itself or a subclass (else the
        error names the missing pass), and come before the pass (else it names the passes
        that do).
        """
        requires = nx.DiGraph()
        requires.add_nodes_from(type(p) for p in passes)
        todo = list(requires.nodes)
        while todo:
            cls = todo.pop()
            for req in cls.requires:
                if req not in requires:
                    todo.append(req)
                requires.add_edge(cls, req)
        try:
            cycle = nx.find_cycle(requires)
        except nx.NetworkXNoCycle:
            cycle = []
        if cycle:
            chain = " -> ".join(cls.__name__ for cls, _ in cycle) + f" -> {cycle[0][0].__name__}"
            raise PassOrderError(
                f"the passes' `requires` form a cycle ({chain}): no pipeline order runs each of them "
                "after the passes it requires; remove one of these requirements"
            )
        pipeline = [type(p).__name__ for p in passes]
        first: dict[type, int] = {}  # where each pass type, or its first subclass, runs
        for i, p in enumerate(passes):
            for cls in type(p).__mro__:
                first.setdefault(cls, i)
        for i, p in enumerate(passes):
            required = list(requires.successors(type(p)))
            absent = [r.__name__ for r in required if r not in first]
            if absent:
                raise PassOrderError(
                    f"pass {type(p).__name__} requires {', '.join(absent)}, which the pipeline {pipeline} "
                    f"does not run; add {', '.join(absent)} before {type(p).__name__}"
                )
            late = [r.__name__ for r in required if first[r] >= i]
            if late:
                before = ", ".join(pipeline[:i]) or "nothing"
                raise PassOrderError(
                    f"pass {type(p).__name__} requires {', '.join(late)} to run before it, "
                    f"but the pipeline runs only [{before}] before it; reorder the pipeline"
                )

    def __call__(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Run the passes on ``gm`` with the garbage collector paused (see :mod:`qgraph.core.gc_pause`)."""
        with gc_paused():
            return self._run(gm)

    def _run(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        from qgraph.core.dump import GraphDumper

        dumper = GraphDumper(Path(self.dump_dir) / self.stage) if self.dump_dir else None
        if dumper:
            dumper.write(0, "input", gm, modified=False)
        for i, p in enumerate(self.passes, start=1):
            start = time.perf_counter()
            try:
                result = p(gm)
                gm = result.graph_module
                gm.graph.lint()
            except QGraphError:
                raise
            except Exception as exc:
                ran = ", ".join(type(q).__name__ for q in self.passes[: i - 1]) or "nothing"
                raise PassError(f"pass {type(p).__name__} failed after [{ran}]: {exc}") from exc
            record = PassRecord(p.name, result.modified, time.perf_counter() - start, len(gm.graph.nodes))
            self.history.append(record)
            if dumper:
                dumper.write(i, p.name, gm, modified=result.modified)
        gm.recompile()  # once: generating Python code is the costly part of a pass on big graphs
        if dumper:
            dumper.write_index(self.history)
        return gm
