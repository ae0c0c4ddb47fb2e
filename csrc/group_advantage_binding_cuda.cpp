// CUDA implementation of zreward::group_advantage: allocates outputs, calls the torch-free launcher
// on the current stream.  Importing zreward_kernels._C (which defines the op) must come first.
#define ZREWARD_WITH_CUDA
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "group_advantage_common.h"

namespace zreward {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    default: TORCH_CHECK(false, "rewards must be float16, bfloat16, float32 or float64, got ", t);
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantage_cuda(
    const at::Tensor& rewards, const std::optional<at::Tensor>& offsets, int64_t group_size, int64_t mode,
    double eps) {
  TORCH_CHECK(rewards.is_cuda(), "group_advantage_cuda got a tensor on ", rewards.device());
  const c10::cuda::CUDAGuard guard(rewards.device());
  Prepared p = prepare(rewards, offsets, group_size, mode);
  const int64_t* off = p.offsets.has_value() ? p.offsets->data_ptr<int64_t>() : nullptr;
  const int err = group_advantage_cuda_launch(
      p.rewards.data_ptr(), dtype_code(p.rewards.scalar_type()), off, p.M, p.G, group_size, static_cast<int>(mode), eps,
      p.adv.data_ptr(), p.mean.data_ptr(), p.stdv.data_ptr(), p.zero_std.data_ptr<bool>(),
      static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
  TORCH_CHECK(err == 0, "group_advantage CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {p.adv, p.mean, p.stdv, p.zero_std};
}

}  // namespace

TORCH_LIBRARY_IMPL(zreward, CUDA, m) { m.impl("group_advantage", &group_advantage_cuda); }

}  // namespace zreward

namespace {
PyObject* set_config(PyObject*, PyObject* args) {
  int elems = 0, kernel = 0;
  if (!PyArg_ParseTuple(args, "ii", &elems, &kernel)) return nullptr;
  if (zreward::group_advantage_cuda_set_config(elems, kernel) != 0) {
    PyErr_Format(PyExc_ValueError,
                 "group_advantage CUDA config: elems_per_lane must be a power of two in 1..32 and kernel 1 or 2, "
                 "got elems_per_lane=%d, kernel=%d",
                 elems, kernel);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* config(PyObject*, PyObject*) {
  return Py_BuildValue("(ii)", zreward::group_advantage_cuda_elems_per_lane(), zreward::group_advantage_cuda_kernel());
}

PyMethodDef methods[] = {
    {"set_config", set_config, METH_VARARGS,
     "set_config(elems_per_lane, kernel): launch settings of the group-advantage CUDA kernel."},
    {"config", config, METH_NOARGS, "The current (elems_per_lane, kernel)."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
