// Every vidstream operator schema, in one place. Backends register implementations in
// TORCH_LIBRARY_IMPL blocks (csrc/cpu/, csrc/cuda/); fake kernels live in vidstream/_fake.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vidstream, m) {
  // SPEC §3: 3D RoPE (Wan2.1 layout), out of place.
  m.def(
      "rope3d(Tensor x, int frames, int height, int width, float frame_offset=0., "
      "float theta=10000., Tensor? t_theta=None) -> Tensor");
  // SPEC §3: in-place temporal re-rotation of token ranges of a pool. Returns nothing
  // so functionalization can treat it as a plain mutation.
  m.def(
      "rope3d_shift_(Tensor(a!) k_pool, Tensor ranges, Tensor delta_frames, "
      "float theta=10000., Tensor? t_theta=None) -> ()");
}

// `import vidstream._C` loads this library and so runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
