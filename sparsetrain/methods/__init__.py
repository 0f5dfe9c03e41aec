"""One file per method; importing this package registers them all."""

from . import acdc, dense, gmp, magnitude, static  # noqa: F401
