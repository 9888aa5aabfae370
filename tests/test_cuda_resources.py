"""tools/analysis_tools/cuda_resources.py, the resource table of `make cuda-check`, on a slice of
ptxas's report (-Xptxas=-v) for the kernels before their scope-pass sums left local memory."""
from tool_modules import load_tool

cuda_resources = load_tool('analysis_tools/cuda_resources.py')

MANGLED = {
    'input_grad_rigid': '_ZN6dk_ops12cuda_kernels67_GLOBAL__N__6815076e_28_deform_kernel_conv2d_'
                        'cuda_cu_5b8758cc_1403723input_grad_rigid_kernelIfEEvNS0_10ColumnViewIT_'
                        'EEllPKS4_PN2at10OpMathTypeIS4_E4typeE',
    'scope_columns': '_ZN6dk_ops12cuda_kernels67_GLOBAL__N__6815076e_28_deform_kernel_conv2d_'
                     'cuda_cu_5b8758cc_1403720scope_columns_kernelIfEEvNS0_10ColumnViewIT_EEPS4_',
    'weight_grad': '_ZN6dk_ops12cuda_kernels13implicit_gemm18weight_grad_kernelIfEEvNS0_10ColumnV'
                   'iewIT_EEPKS4_lllPN2at10OpMathTypeIS4_E4typeE',
}
REPORT = f"""\
ptxas info    : Compiling entry function '{MANGLED['input_grad_rigid']}' for 'sm_90'
ptxas info    : Function properties for {MANGLED['input_grad_rigid']}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 0 barriers
ptxas info    : Compiling entry function '{MANGLED['scope_columns']}' for 'sm_90'
ptxas info    : Function properties for {MANGLED['scope_columns']}
    64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 0 barriers, 64 bytes cumulative stack size
ptxas info    : Compile time = 102.179 ms
ptxas info    : Compiling entry function '{MANGLED['weight_grad']}' for 'sm_80'
ptxas info    : Function properties for {MANGLED['weight_grad']}
    80 bytes stack frame, 20 bytes spill stores, 44 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 80 bytes cumulative stack size, \
32768 bytes smem
"""


def test_every_kernel_of_the_report_with_its_resources():
    kernels = cuda_resources.parse_ptxas_report(REPORT)
    assert [(k.name, k.arch, k.registers, k.stack, k.spill_stores, k.spill_loads, k.static_smem)
            for k in kernels] == [
        ('input_grad_rigid_kernel<float>', 'sm_90', 56, 0, 0, 0, 0),
        ('scope_columns_kernel<float>', 'sm_90', 96, 64, 0, 0, 0),
        ('weight_grad_kernel<float>', 'sm_80', 128, 80, 20, 44, 32768),
    ]


def test_a_hot_kernel_with_a_stack_frame_or_spills_fails():
    rigid, scope_columns, weight_grad = cuda_resources.parse_ptxas_report(REPORT)
    assert rigid.problems() == []
    assert scope_columns.problems() == ['64 bytes of stack frame (a local-memory array)']
    assert len(weight_grad.problems()) == 2
    assert {k.base_name for k in (rigid, scope_columns, weight_grad)} <= set(
        cuda_resources.HOT_KERNELS)


def test_the_table_has_the_documented_columns():
    table = cuda_resources.markdown_table(cuda_resources.parse_ptxas_report(REPORT))
    header, _, *rows = table.splitlines()
    assert header == ('| kernel | registers/thread | spill stores | spill loads | stack | '
                      'static smem | dynamic smem |')
    assert rows[1] == '| scope_columns_kernel<float> | 96 | 0 | 0 | 64 | 0 | 0 |'
