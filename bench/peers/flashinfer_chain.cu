// FlashInfer's chain speculative sampling kernel behind a C entry point, so that the benchmarks can
// run it where FlashInfer's Python package cannot be installed (the GPU machine has no index and
// FlashInfer compiles its kernels at first use). Built by build_flashinfer_chain.sh against the
// headers of a pinned flashinfer-python wheel; the kernel and its host launcher are FlashInfer's own,
// called as flashinfer.sampling.chain_speculative_sampling calls them (fp32 probabilities, int32 ids,
// deterministic=True, one seed and offset for the batch).
#include <flashinfer/sampling.cuh>

extern "C" int chain_speculative_sampling_f32(float* draft_probs, int* draft_token_ids, float* target_probs,
                                              int* output_token_ids, int* output_accepted_token_num,
                                              int* output_emitted_draft_token_num, unsigned batch_size,
                                              unsigned num_speculative_tokens, unsigned vocab_size,
                                              unsigned long long seed, unsigned long long offset, void* stream) {
  try {
    return static_cast<int>(flashinfer::sampling::ChainSpeculativeSampling<float, int>(
        draft_probs, draft_token_ids, target_probs, output_token_ids, output_accepted_token_num,
        output_emitted_draft_token_num, batch_size, num_speculative_tokens, vocab_size, /*deterministic=*/true,
        /*seed_arr=*/nullptr, seed, /*offset_arr=*/nullptr, offset, static_cast<cudaStream_t>(stream)));
  } catch (...) {
    // A C++ exception must not cross the C boundary into ctypes.
    return -1;
  }
}
