"""numba plumbing of the fused engine: the import guard (``AVAILABLE``), the jit options, bit-cast
and vector-width intrinsics and the vectorisable ``exp`` (:func:`_fexp`)."""

from __future__ import annotations

import contextlib
import math

import numpy as np

try:  # pragma: no cover - depends on the environment
    from llvmlite import ir as _llir
    from numba import njit as njit  # the kernel modules take it from here
    from numba import types
    from numba.extending import intrinsic, overload

    AVAILABLE = True
except Exception:  # noqa: BLE001  # pragma: no cover - numba missing or broken (any import error)
    AVAILABLE = False

#: logit given to pairs dropped by a support cut (its ``exp`` is exactly 0).
_NEG = -1.0e30


if AVAILABLE:
    _FM = {"nsz", "arcp", "contract", "reassoc", "afn"}  # no nnan/ninf: infinities stay meaningful
    _JIT = {"fastmath": _FM, "cache": True, "nogil": True}

    @intrinsic
    def _bits_to_f32(typingctx, x):
        """Reinterpret the bits of an int32 as a float32 (vectorisable)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llir.FloatType())

        return sig, codegen

    @intrinsic
    def _bits_to_f64(typingctx, x):
        """Reinterpret the bits of an int64 as a float64 (vectorisable)."""
        sig = types.float64(types.int64)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llir.DoubleType())

        return sig, codegen

    @intrinsic
    def _wide_vectors(typingctx):
        """Ask LLVM to vectorise the calling function with 512-bit vectors where the CPU has them
        (a function attribute; ignored elsewhere)."""
        sig = types.none()

        def codegen(context, builder, signature, args):
            # a string attribute, which llvmlite's checked ``add`` does not know: add it to the set itself;
            # with another llvmlite (no set underneath), keep LLVM's default width
            with contextlib.suppress(Exception):
                set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _half_bits(typingctx, x):
        """IEEE binary16 bits (int16) of a float32: LLVM's ``fptrunc`` to ``half`` (``vcvtps2ph`` on
        F16C / AVX-512 CPUs, vectorised), round to nearest even, as numpy and torch."""
        sig = types.int16(types.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], _llir.HalfType()), _llir.IntType(16))

        return sig, codegen

    @intrinsic
    def _csr(typingctx, value):
        """Swap the x86 floating-point control word (MXCSR) with ``value`` (int32; -1 leaves it as it is);
        returns the previous one. On other CPUs (no MXCSR) returns -1 and does nothing."""
        sig = types.int32(types.int32)

        def codegen(context, builder, signature, args):
            from numba.core import cgutils

            slot = cgutils.alloca_once(builder, _llir.IntType(32))
            ptr = builder.bitcast(slot, _llir.IntType(8).as_pointer())
            mod = builder.module
            fty = _llir.FunctionType(_llir.VoidType(), [_llir.IntType(8).as_pointer()])
            st = cgutils.get_or_insert_function(mod, fty, "llvm.x86.sse.stmxcsr")
            ld = cgutils.get_or_insert_function(mod, fty, "llvm.x86.sse.ldmxcsr")
            builder.call(st, [ptr])
            old = builder.load(slot)
            keep = builder.icmp_signed("==", args[0], _llir.Constant(_llir.IntType(32), -1))
            builder.store(builder.select(keep, old, args[0]), slot)
            builder.call(ld, [ptr])
            return old

        return sig, codegen

    def _fexp(x):  # pragma: no cover - replaced by the overload below inside numba
        return np.exp(x)

    @overload(_fexp)
    def _fexp_overload(x):
        """``exp(x)`` for ``x <= 0``, vectorisable (no libm call): ``2^n * poly(r)``.

        Range reduction ``x = n ln2 + r`` with ``|r| <= ln2 / 2`` (two-constant ln2),
        Taylor polynomial of degree 7 (float32, < 1 ulp from truncation) or 13
        (float64, ~1e-16), and ``2^n`` built from the exponent bits. Inputs below the
        smallest normal exponent give exactly 0.
        """
        if x == types.float32:
            lo, log2e = np.float32(-87.0), np.float32(1.4426950408889634)
            c1, c2 = np.float32(0.693359375), np.float32(-2.12194440e-4)
            t2, t3, t4, t5, t6, t7 = (np.float32(1.0 / math.factorial(k)) for k in range(2, 8))
            one = np.float32(1.0)

            def impl32(x):
                xc = max(x, lo)
                n = np.floor(xc * log2e + np.float32(0.5))
                r = (xc - n * c1) - n * c2
                p = ((((((t7 * r + t6) * r + t5) * r + t4) * r + t3) * r + t2) * r + one) * r + one
                s = _bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))
                return np.float32(0.0) if x < lo else p * s

            return impl32
        if x == types.float64:
            lo, log2e = -708.0, 1.4426950408889634
            c1, c2 = 6.93147180369123816490e-01, 1.90821492927058770002e-10
            u2, u3, u4, u5, u6, u7, u8, u9, u10, u11, u12, u13 = (
                1.0 / math.factorial(k) for k in range(2, 14)
            )

            def impl64(x):
                xc = max(x, lo)
                n = np.floor(xc * log2e + 0.5)
                r = (xc - n * c1) - n * c2
                p = u13 * r + u12
                p = (((p * r + u11) * r + u10) * r + u9) * r + u8
                p = (((p * r + u7) * r + u6) * r + u5) * r + u4
                p = (((p * r + u3) * r + u2) * r + 1.0) * r + 1.0
                s = _bits_to_f64((np.int64(n) + np.int64(1023)) << np.int64(52))
                return 0.0 if x < lo else p * s

            return impl64
        return None


#: MXCSR bits: flush denormal results to zero (FTZ) and treat denormal inputs as zero (DAZ)
_FTZ_DAZ = 0x8040

if AVAILABLE and __import__("platform").machine().lower() in ("x86_64", "amd64"):

    @njit(nogil=True, cache=True)
    def _ftz_begin():
        """Set FTZ/DAZ on the calling thread; returns the control word to restore (:func:`_ftz_end`)."""
        old = _csr(np.int32(-1))
        _csr(np.int32(old | _FTZ_DAZ))
        return old

    @njit(nogil=True, cache=True)
    def _ftz_end(old):
        """Restore the control word saved by :func:`_ftz_begin`."""
        _csr(np.int32(old))

else:  # pragma: no cover - no MXCSR: denormals stay as the platform has them

    def _ftz_begin():
        return 0

    def _ftz_end(old):
        return None
