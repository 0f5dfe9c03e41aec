"""One file per method; importing this package registers them all."""

from . import (  # noqa: F401
    acdc,
    cram,
    dense,
    gap,
    gmp,
    imp,
    magnitude,
    mfac,
    oto,
    pgap,
    rda,
    rigl,
    set,
    static,
    transfer,
    variational,
    vrpg,
)
