// Every vidstream operator schema, in one place. Backends register implementations in
// TORCH_LIBRARY_IMPL blocks (csrc/cpu/, csrc/cuda/); the fake kernels sit beside each op's
// Python entry point (vidstream/ops/). Index tensors (ranges, kv_ranges, block_ranges,
// frame_slots) are int32 on the device of the data they index: the CUDA ops never copy them to
// the host (csrc/ranges.h).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vidstream, m) {
  // docs/spec.md §3: 3D RoPE (Wan2.1 layout), out of place.
  m.def(
      "rope3d(Tensor x, int frames, int height, int width, float frame_offset=0., "
      "float theta=10000., Tensor? t_theta=None, bool inverse=False) -> Tensor");
  // docs/spec.md §3: in-place temporal re-rotation of token ranges of a pool. Returns nothing
  // so functionalization can treat it as a plain mutation.
  m.def(
      "rope3d_shift_(Tensor(a!) k_pool, Tensor ranges, Tensor delta_frames, "
      "float theta=10000., Tensor? t_theta=None) -> ()");

  // docs/spec.md §1: full-sequence chunk-causal sink + window attention. Always returns the
  // float32 log-sum-exp lse [B, H, L] beside out [B, L, H, Dv]; the Python wrapper drops it
  // when unasked.
  m.def(
      "chunk_attention(Tensor q, Tensor k, Tensor v, int frame_tokens, int chunk_frames, "
      "int sink_frames, int? window_frames, float scale) -> (Tensor out, Tensor lse)");
  // docs/spec.md §2: one chunk's queries against the union of token ranges [R, 2] of a KV pool.
  // kv_deltas (float64 [R], on q's device, None: all 0) moves every key of range r by
  // kv_deltas[r] frames in time as rope3d_shift_ would (theta, t_theta as for rope3d), inside
  // the kernel: the pool is never written.
  m.def(
      "cached_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor kv_ranges, float scale, "
      "Tensor? kv_deltas=None, float theta=10000., Tensor? t_theta=None) "
      "-> (Tensor out, Tensor lse)");
  // Backward of chunk_attention from its saved out and lse (never forms L x L).
  m.def(
      "chunk_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int frame_tokens, int chunk_frames, int sink_frames, int? window_frames, "
      "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Backward of cached_attention: dk_pool and dv_pool are zero outside kv_ranges; with
  // kv_deltas, dk_pool is the gradient of the stored (unshifted) keys.
  m.def(
      "cached_attention_backward(Tensor dout, Tensor q, Tensor k_pool, Tensor v_pool, "
      "Tensor out, Tensor lse, Tensor kv_ranges, float scale, Tensor? kv_deltas=None, "
      "float theta=10000., Tensor? t_theta=None) -> (Tensor dq, Tensor dk_pool, Tensor dv_pool)");

  // docs/spec.md §4: low-rank latent KV. num_tokens (the token count of kv_ranges, known to the
  // caller) makes K/V's shape computable without reading the ranges.
  m.def(
      "lowrank_decompress(Tensor c_pool, Tensor w_uk, Tensor w_uv, Tensor kv_ranges, "
      "int num_tokens, Tensor? k_r_pool=None) -> (Tensor, Tensor)");
  // Fused attention over the latent cache; returns (out, lse). absorb=False decompresses one KV
  // tile at a time inside the kernel, absorb=True attends in the latent space (w_uk folded into
  // the queries, w_uv applied to the output).
  m.def(
      "lowrank_cached_attention(Tensor q, Tensor c_pool, Tensor w_uk, Tensor w_uv, "
      "Tensor kv_ranges, Tensor? k_r_pool=None, float scale=1., bool absorb=False, "
      "Tensor? kv_deltas=None, float theta=10000.) -> (Tensor, Tensor)");

  // docs/spec.md §5: top-k mid-block selection. Returns (scores float32 [M], indices int64
  // [min(k, M)] ascending); heads are query heads, block_key_sums [B, M, H_kv, D] replaces
  // the keys' block sums under score "mean".
  m.def(
      "select_blocks(Tensor q, Tensor k_pool, Tensor block_ranges, int k, int query_stride, "
      "int[] heads, str score, float scale, Tensor? block_key_sums=None, "
      "Tensor? block_deltas=None, float theta=10000., Tensor? t_theta=None) -> (Tensor, Tensor)");

  // docs/spec.md §6: streaming cache helpers (schemas added by the streaming work).
  // Rotates k [B, L, H_kv, D] (grid F x height x width, frame f at temporal position
  // frame_pos[f]) by the 3D RoPE and writes it and v into k_pool/v_pool at tokens
  // [frame_slots[f], frame_slots[f] + height*width): one pass per chunk and layer.
  m.def(
      "rope3d_store_(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor k, Tensor v, "
      "Tensor frame_slots, Tensor frame_pos, int height, int width, float theta=10000., "
      "Tensor? t_theta=None) -> ()");
}

// `import vidstream._C` loads this library and so runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
