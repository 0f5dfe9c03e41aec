import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker: its work is done and its process group destroyed. Under load, gloo's threads have been
    # seen to abort in a C++ destructor at interpreter exit ("terminate called without an active exception",
    # SIGABRT), turning a finished run into a failed one; skipping the interpreter's teardown avoids that.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
