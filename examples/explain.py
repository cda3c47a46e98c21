# python examples/explain.py     (simulates 4 ranks in this process: no GPU, no launcher)
import para_fx
from para_fx.testing import zoo

model, inputs = zoo.flux()                         # a tiny random FLUX transformer: yours here
report = para_fx.explain(model, kwargs=inputs, world_size=4, ulysses=2, ring=2,   # rank 0's view
                         cache=para_fx.FirstBlockCache(0.08))
print(report)                                      # the verdict, then blocks, attention sites, fallbacks, ...
print(report.graph_diff("captured", "shard_seq"))  # what a pass changed, as a unified diff
report.save_html("report.html")                    # one self-contained page: the tables and every pass's graph
