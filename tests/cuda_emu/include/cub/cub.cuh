// CUB's device-wide prefix sum and radix sort as the kernels call them, under cuda_emu
// (tests only): synchronous host code that keeps CUB's contract, so that the kernels'
// use of it is checked too:
//   * the two-call protocol: a null temp pointer asks for the temporary storage's size;
//     the real call gets at least that much, and the sort really uses all of it
//     (AddressSanitizer sees a caller that allocates less);
//   * SortPairs is a stable LSD radix sort of key bits [begin_bit, end_bit) only: keys
//     that differ only outside those bits keep their input order, as on a GPU, so a key
//     layout that needs more bits than it sorts gives wrong lists here too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <string>
#include <type_traits>

#include "../cuda_emu.h"

namespace cub {

struct DeviceScan {
  template <class In, class Out, class NumItems>
  static cudaError_t InclusiveSum(void* temp, size_t& temp_bytes, In in, Out out, NumItems n,
                                  cudaStream_t = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 1;  // CUB asks for some; none is needed here
      return cudaSuccess;
    }
    using Value = std::remove_cv_t<std::remove_reference_t<decltype(*in)>>;
    Value sum{};
    for (NumItems i = 0; i < n; ++i) {
      sum = sum + in[i];
      out[i] = sum;
    }
    return cudaSuccess;
  }
};

struct DeviceRadixSort {
  template <class Key, class Value, class NumItems>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const Key* keys_in, Key* keys_out,
                               const Value* values_in, Value* values_out, NumItems n, int begin_bit = 0,
                               int end_bit = int(sizeof(Key) * 8), cudaStream_t = nullptr) {
    static_assert(std::is_unsigned_v<Key>, "cuda_emu sorts unsigned keys only");
    const size_t needed = size_t(n) * (sizeof(Key) + sizeof(Value)) + 1;
    if (temp == nullptr) {
      temp_bytes = needed;
      return cudaSuccess;
    }
    if (temp_bytes < needed)
      ::cuda_emu::fail("cub::DeviceRadixSort::SortPairs: " + std::to_string(temp_bytes) +
                       " bytes of temporary storage, fewer than the " + std::to_string(needed) + " it asked for");
    if (begin_bit < 0 || end_bit > int(sizeof(Key) * 8) || begin_bit > end_bit)
      ::cuda_emu::fail("cub::DeviceRadixSort::SortPairs: bits [" + std::to_string(begin_bit) + ", " +
                       std::to_string(end_bit) + ") of a " + std::to_string(sizeof(Key) * 8) + "-bit key");
    // Ping-pong between the outputs and the temporary storage, 8 bits per pass.
    Key* key_tmp = static_cast<Key*>(temp);
    Value* value_tmp = reinterpret_cast<Value*>(static_cast<char*>(temp) + size_t(n) * sizeof(Key));
    std::memcpy(keys_out, keys_in, size_t(n) * sizeof(Key));
    std::memcpy(values_out, values_in, size_t(n) * sizeof(Value));
    Key *keys = keys_out, *keys_next = key_tmp;
    Value *values = values_out, *values_next = value_tmp;
    for (int bit = begin_bit; bit < end_bit; bit += 8) {
      const int width = end_bit - bit < 8 ? end_bit - bit : 8;
      const Key mask = Key((1u << width) - 1);
      size_t start[257] = {};
      for (NumItems i = 0; i < n; ++i) ++start[((keys[i] >> bit) & mask) + 1];
      for (int d = 0; d < 256; ++d) start[d + 1] += start[d];
      for (NumItems i = 0; i < n; ++i) {
        const size_t at = start[(keys[i] >> bit) & mask]++;
        keys_next[at] = keys[i];
        values_next[at] = values[i];
      }
      std::swap(keys, keys_next);
      std::swap(values, values_next);
    }
    if (keys != keys_out) {
      std::memcpy(keys_out, keys, size_t(n) * sizeof(Key));
      std::memcpy(values_out, values, size_t(n) * sizeof(Value));
    }
    return cudaSuccess;
  }
};

}  // namespace cub
