"""Parallelism as transforms of the single-device model (chapters 3, 5 and 6).

Read in this order:

* ``schedules``   pipeline schedules as data (1F1B, ZB1P, DualPipe, DualPipeV) and their placement
* ``simulate``    a discrete-event simulator of those schedules (bubbles, memory, Gantt charts)
* ``stages``      a stage = a slice of the Transformer's own blocks; the one-process reference step
* ``weight_grad`` the weight-gradient store that makes zero-bubble ``W`` ops real
* ``p2p``         one step's point-to-point messages between pipeline ranks
* ``pipeline``    the runtime that executes a schedule's op lists across processes
* ``expert``      expert parallelism: the MoE's routed experts sharded, tokens exchanged by all-to-all
* ``layout``      which rank does what: the pp × dp × ep device mesh and its process groups
* ``parallelize`` the composition: FP8, expert shards, pipeline stages, gradient sums -> ``runner.step``
* ``launch``      start N processes (or join torchrun's), and end the whole job when one rank fails
* ``overlap``     measure and draw how much all-to-all hid under the other half of a pair
* ``checks``      harness: parallel results held against one process (the chapters and tests use it)

``torchrun --nproc-per-node 4 -m dsv3lib.parallel --pp 2 --ep 2`` trains a tiny model for a few steps.
"""
