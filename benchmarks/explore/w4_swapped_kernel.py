import triton, triton.language as tl

@triton.jit
def _unpack_lohi(wb, SWAR: tl.constexpr):
    """packed bytes (uint8) -> (low-nibble codes, high-nibble codes) as int8 in [-8, 7]."""
    if SWAR:
        # 4 bytes per 32-bit register: lop3/sub/xor on all four lanes at once.
        # t = nibble ^ 8 in [0,15]; ((t | 0x80) - 8) ^ 0x80 = t - 8 per byte, no borrow between lanes.
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, u;
            and.b32 t, $2, 0x0f0f0f0f;
            xor.b32 t, t, 0x88888888;
            sub.u32 t, t, 0x08080808;
            xor.b32 $0, t, 0x80808080;
            shr.u32 u, $2, 4;
            and.b32 u, u, 0x0f0f0f0f;
            xor.b32 u, u, 0x88888888;
            sub.u32 u, u, 0x08080808;
            xor.b32 $1, u, 0x80808080;
            }""",
            constraints="=r,=r,r",
            args=[wb],
            dtype=(tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
        return lo, hi
    else:
        b = wb.to(tl.int8, bitcast=True)
        return (b << 4) >> 4, b >> 4


@triton.jit
def w4_swapped_kernel(
    x_ptr, w_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, w_sum_ptr, y_ptr,
    M, N, K, KB, stride_xm, stride_wn, stride_ym,
    SWAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """y = (x codes (int8 [M,K]) · W codes (packed 4-bit [N, K/2])ᵀ - z·w_sum) · sx · sw, computed as
    Yᵀ = W Xᵀ: the unpacked weight is the MMA's A operand, straight from registers."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_N * num_pid_m
    first_n = (pid // per_group) * GROUP_N
    group_n = min(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_m = (pid % per_group) // group_n
    HALF: tl.constexpr = BLOCK_K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = (offs_n % N).to(tl.int64)
    rows_m = (offs_m % M).to(tl.int64)
    offs_j = tl.arange(0, HALF)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_j[None, :]
    x_ptrs = x_ptr + rows_m[None, :] * stride_xm + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        wb = tl.load(w_ptrs)
        lo, hi = _unpack_lohi(wb, SWAR)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        x = tl.load(x_ptrs)
        acc = tl.dot(w, x, acc, out_dtype=tl.int32)
        w_ptrs += HALF
        x_ptrs += BLOCK_K
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_zero = tl.load(x_zero_ptr + offs_m, mask=m_ok, other=0)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)
    w_sum = tl.load(w_sum_ptr + offs_n, mask=n_ok, other=0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc - w_sum[:, None] * x_zero[None, :]
    y = acc.to(tl.float32) * x_scale[None, :] * w_scale[:, None]
    y = tl.trans(y)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
