"""Model files, loading, scheduling and generation (llama.cpp in-process, or a remote server).

llama.cpp's CPU backend runs its threads as an OpenMP team, and libgomp spins only 100 times
at each barrier (a decode of the 135M model has about a thousand) once its threads outnumber
the cores, then sleeps and must be woken.  That happens as soon as a second thread decodes:
a second loaded model, or the serial path's thread beside a batched model.  On 2 cores every
decode then took 29.6 ms a token instead of 11.2.  ``OMP_WAIT_POLICY=ACTIVE`` raises those
spins to 1,000, and ``GOMP_SPINCOUNT`` keeps libgomp's own default otherwise (about 3 ms of
spinning before an idle thread sleeps, so an idle bot uses no CPU).  libgomp reads them once,
when llama.cpp's libraries load: this package sets them first; values already set win.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "300000")
