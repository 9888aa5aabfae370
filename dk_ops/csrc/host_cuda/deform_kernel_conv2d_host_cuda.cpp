// dk_ops._C_host_cuda: the CUDA kernels of cuda/deform_kernel_conv2d_cuda.cu compiled for host
// threads (cuda/host_emulation.h), so that the tests run the GPU's kernel source on a CPU. It
// links to dk_ops._C and calls its shared driver, as the CUDA build does. Its ops,
// torch.ops.dk_ops_host_cuda.*, take CPU tensors; torch.ops.dk_ops is left as it is.
#include <Python.h>

#define DK_HOST_EMULATION
#include "../cuda/deform_kernel_conv2d_cuda.cu"

// `import dk_ops._C_host_cuda` loads this library (and so runs the registration of the ops);
// the Python module itself is empty.
extern "C" PyObject* PyInit__C_host_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_host_cuda", nullptr, -1,
                                      nullptr};
  return PyModule_Create(&module);
}
