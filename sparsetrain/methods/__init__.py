"""One file per method; importing this package registers them all."""

from . import acdc, dense, gap, gmp, imp, magnitude, pgap, rigl, set, static  # noqa: F401
