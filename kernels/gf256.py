"""GF(2^8) bulk multiply: rows of coefficients times rows of bytes.

``dst[i] = XOR_j coef[i, j] * src[j]`` over columns [lo, hi), in GF(2^8) with
the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), the field of standard
Reed-Solomon codes. Rows live in flat byte buffers at given offsets, so a
stripe read from a file is used where it lies, without copying shards into a
matrix first.

Two kernels, chosen at run time (``resync.erasure`` asks ``native.cpu_flags``):

* ``gf_mul_gfni`` (x86 with GFNI and AVX2): multiplying by a constant c is a
  linear map on the 8 bits of a byte, so it is one 8x8 bit matrix, and
  ``vgf2p8affineqb`` applies such a matrix to 32 bytes per instruction, for
  any polynomial (GF2P8MULB itself is fixed to AES's 0x11b). Each output's 32
  bytes stay in a register while all inputs are folded in.
* ``gf_mul_portable``: for each input tile, its eight doublings x, 2x, 4x, ...
  128x (the xtime step ``(x + x) ^ ((x >> 7) * 0x1d)``) go into a scratch
  buffer once; then c*x is the XOR of the doublings selected by c's bits.
  Plain byte loops over tiles, which LLVM vectorizes for whatever SIMD the CPU
  has.

Both only use the arrays they are given (no allocation), release the GIL, and
are tested against ``tests/naive.py``.
"""
from llvmlite import ir
from numba import types, uint8
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import inline, kernel

POLY = 0x11D
TILE = 2048             # columns per pass; TILE * 8 bytes of doublings stay in L1
SCRATCH = 8 * TILE      # bytes of scratch gf_mul_portable needs
VEC = 32                # bytes per GFNI instruction (AVX2 registers)
GFNI_TILE = 512         # columns per pass of gf_mul_gfni: inputs * GFNI_TILE bytes stay in L1


@inline
def _xtime_into(dst, src):
    for t in range(src.shape[0]):
        x = src[t]
        dst[t] = uint8(uint8(x + x) ^ uint8((x >> uint8(7)) * uint8(0x1D)))


@inline
def _xor_into(dst, src):
    for t in range(src.shape[0]):
        dst[t] ^= src[t]


@inline
def _zero(dst):
    for t in range(dst.shape[0]):
        dst[t] = 0


@kernel
def gf_mul_portable(coef, src, src_offsets, dst, dst_offsets, lo, hi, scratch):
    """dst[dst_offsets[i] + c] = XOR_j coef[i, j] * src[src_offsets[j] + c] for
    lo <= c < hi. ``coef`` is (rows, inputs); ``scratch`` holds SCRATCH bytes."""
    rows = coef.shape[0]
    inputs = coef.shape[1]
    for t0 in range(lo, hi, TILE):
        n = min(TILE, hi - t0)
        for i in range(rows):
            o = dst_offsets[i] + t0
            _zero(dst[o:o + n])
        for j in range(inputs):
            o = src_offsets[j] + t0
            x = src[o:o + n]
            need = uint8(0)
            for i in range(rows):
                need |= coef[i, j]
            if need == 0:
                continue
            # doublings[b] = x * 2**b, made only as far as some coefficient needs
            top = 0
            while (need >> (top + 1)) != 0:
                top += 1
            for b in range(1, top + 1):
                prev = x if b == 1 else scratch[(b - 1) * TILE:(b - 1) * TILE + n]
                _xtime_into(scratch[b * TILE:b * TILE + n], prev)
            for i in range(rows):
                c = coef[i, j]
                if c == 0:
                    continue
                o = dst_offsets[i] + t0
                out = dst[o:o + n]
                if c & 1:
                    _xor_into(out, x)
                for b in range(1, top + 1):
                    if (c >> b) & 1:
                        _xor_into(out, scratch[b * TILE:b * TILE + n])


@intrinsic
def _gfni_dot(typingctx, src, src_offsets, mats, mat0, inputs, pos, dst, dpos):
    """dst[dpos:dpos+32] = XOR over j < inputs of affine(mats[mat0 + j],
    src[src_offsets[j] + pos : +32]): one output's 32 bytes, kept in a
    register while every input is folded in."""
    sig = types.void(src, src_offsets, mats, mat0, inputs, pos, dst, dpos)

    def codegen(context, builder, signature, args):
        src_v, offs_v, mats_v, mat0_v, n_v, pos_v, dst_v, dpos_v = args
        at = signature.args
        src_a = context.make_array(at[0])(context, builder, src_v)
        offs_a = context.make_array(at[1])(context, builder, offs_v)
        mats_a = context.make_array(at[2])(context, builder, mats_v)
        dst_a = context.make_array(at[6])(context, builder, dst_v)
        i8, i64 = ir.IntType(8), ir.IntType(64)
        vec = ir.VectorType(i8, VEC)
        qvec = ir.VectorType(i64, VEC // 8)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, i8]), "llvm.x86.vgf2p8affineqb.256")
        acc = cgutils.alloca_once_value(builder, ir.Constant(vec, None))
        pos64 = context.cast(builder, pos_v, at[5], types.int64)
        mat0_64 = context.cast(builder, mat0_v, at[3], types.int64)
        n64 = context.cast(builder, n_v, at[4], types.int64)
        with cgutils.for_range(builder, n64) as loop:
            j = loop.index
            off = builder.load(builder.gep(offs_a.data, [j]))
            p = builder.gep(src_a.data, [builder.add(off, pos64)])
            x = builder.load(builder.bitcast(p, vec.as_pointer()), align=1)
            m = builder.load(builder.gep(mats_a.data, [builder.add(mat0_64, j)]))
            mv = ir.Constant(qvec, None)
            for lane in range(VEC // 8):
                mv = builder.insert_element(mv, m, ir.Constant(ir.IntType(32), lane))
            y = builder.call(fn, [x, builder.bitcast(mv, vec), ir.Constant(i8, 0)])
            builder.store(builder.xor(builder.load(acc), y), acc)
        d = builder.gep(dst_a.data, [context.cast(builder, dpos_v, at[7], types.int64)])
        builder.store(builder.load(acc), builder.bitcast(d, vec.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@kernel
def gf_mul_gfni(coef, mats, src, src_offsets, dst, dst_offsets, lo, hi, table):
    """gf_mul_portable's result with GFNI: ``mats[i * inputs + j]`` is the bit
    matrix of ``coef[i, j]`` (see ``bit_matrix``); columns past the last whole
    32 bytes use ``table`` (the 256x256 product table, flattened)."""
    rows = coef.shape[0]
    inputs = coef.shape[1]
    for t0 in range(lo, hi, GFNI_TILE):
        n = min(GFNI_TILE, hi - t0)
        whole = n - n % VEC
        for i in range(rows):
            d = dst_offsets[i]
            for c in range(t0, t0 + whole, VEC):
                _gfni_dot(src, src_offsets, mats, i * inputs, inputs, c, dst, d + c)
            for c in range(t0 + whole, t0 + n):
                acc = uint8(0)
                for j in range(inputs):
                    acc ^= table[(int(coef[i, j]) << 8) | int(src[src_offsets[j] + c])]
                dst[d + c] = acc
