"""``coformer bench``: CoFormer against the strategies a user would otherwise deploy,
on the same emulated devices, the same inputs, in one run (paper §II-B, §IV,
Fig. 3/4/10/12, Tables III-V).

Strategies (all from the same teacher's real weights, all served by the same
runtime, see :mod:`coformer.compiler.baselines`): ``coformer`` (the bundle),
``uniform`` (DeViT-style: the same sub-model size on every device, calibrated
like CoFormer's), ``student`` and ``student_matched`` (one sub-model alone on the
central device, searched and calibrated like CoFormer's: within its whole budget, and
within the compute time of CoFormer's slowest device; see
:func:`.strategies.prepare_bundles`), ``teacher`` (alone on the central, strongest device),
``pipeline`` (EdgeShard-style) and ``tensor_parallel`` (Galaxy-style).

Where the input comes from matters as much as the network:

* ``device``: every device captures the input itself (the paper's setting:
  cameras at every device). Workers load the test inputs and the central node
  sends an index, so only features cross the links.
* ``central``: the input arrives at the central node, which sends it to the
  devices that need it: the honest cost of distributing it.

The teacher, the pipeline and tensor parallelism consume the input only on the
central device, so for them both settings are the same run (reported once,
as ``central``).

Every request's latency is the client's round trip (the client sits on the
central device's side of an unshaped link). Breakdown of the critical path,
from the central node's clock (see ``coformer.runtime.central``): ``compute``
(the central node's own compute outside rounds plus, per round, the part that
finished last), ``transfer`` (the last worker's dispatch-to-answer time less
its service time: the links both ways), ``aggregation``, ``other`` (the rest of
the round trip: message handling, the client link, waiting).

Throughput: after its last pass each run also serves ``--throughput`` concurrent
clients (default 1 and 8) for ``--throughput-seconds`` each and reports answers per
second (``throughput`` in its row; ``throughput_Nx_vs_S`` in ``ratios``).
The package, along the lines of its work: :mod:`.options` (what the command line
names), :mod:`.strategies` (building and checking each strategy's bundle),
:mod:`.runner` (serving them, through :func:`coformer.tools.served.measure_bundles`),
:mod:`.report` (ratios and markdown) and :mod:`.plots`.
"""

from coformer.tools.bench.options import (ALL_INPUT_SOURCES, DEFAULT_BANDWIDTHS, INPUT_SOURCES, STRATEGIES,
                                          bandwidth_name, parse_bandwidths, parse_choice, parse_clients, parse_counts)
from coformer.tools.bench.report import format_summary, markdown, ratios
from coformer.tools.bench.runner import (BENCH_MEMORY, check_testbed, is_text_quickstart, memory_story,
                                         quickstart_inputs, run_bench, run_model_bench, run_quickstart_bench,
                                         run_text_quickstart_bench)
from coformer.tools.bench.strategies import (BUNDLES_VERSION, bundle_devices, bundles_digest, check_bundle_matches,
                                             prepare_bundles, strategies_for)

__all__ = ["ALL_INPUT_SOURCES", "BENCH_MEMORY", "BUNDLES_VERSION", "DEFAULT_BANDWIDTHS", "INPUT_SOURCES", "STRATEGIES",
           "bandwidth_name",
           "bundle_devices", "bundles_digest", "check_bundle_matches", "check_testbed", "format_summary", "is_text_quickstart", "markdown",
           "memory_story", "parse_bandwidths", "parse_choice", "parse_clients", "parse_counts", "prepare_bundles", "quickstart_inputs",
           "ratios", "run_bench", "run_model_bench", "run_quickstart_bench", "run_text_quickstart_bench", "strategies_for"]
