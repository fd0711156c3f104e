// Multi-resolution hash encoding (Instant-NGP, Müller et al. 2022), shared by the C++ CPU
// path (cpu/hash_encoding.cpp) and the CUDA path (kernels/hash_encode_*.cu).
//
// One level of the encoding of one point:
//   p = clamp(x, 0, 1) * scale + 0.5          (x: [D] in the unit cube or square)
//   cell = floor(p), frac = p - cell
//   out[f] = sum over the 2^D corners c of  w_c * table[index(cell + c)][f],
//   w_c = prod_d (c_d ? frac_d : 1 - frac_d)  (D-linear interpolation)
// index(): a dense grid (row-major, x fastest) when the level's `res`^D corners fit the
// table, else the spatial hash of Instant-NGP: XOR of the coordinates times the primes
// (1, 2654435761, 805459861), modulo the table size (a power of two).
// res = floor(scale + 0.5) + 2 so that every corner of a point in the unit cube is on the
// dense grid. Points outside the cube use its boundary; their position gradient is zero.
//
// Each forward function has its vector-Jacobian product next to it; every function is
// inline and templated on the scalar type, so the CPU runs it in float or double (for
// finite differences) and CUDA in float.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define HASH_HD __host__ __device__ __forceinline__
#else
#define HASH_HD inline
#endif

namespace hashgrid {

// The spatial hash's multiplier of axis d (a function: device code cannot read a host array).
HASH_HD uint32_t prime(int d) { return d == 0 ? 1u : (d == 1 ? 2654435761u : 805459861u); }

// True when a level of `res` corners per side is stored densely in `table_size` entries.
HASH_HD bool is_dense(int dims, uint32_t res, uint32_t table_size) {
  uint64_t corners = 1;
  for (int d = 0; d < dims; ++d) corners *= res;
  return corners <= table_size;
}

// The table row of grid corner `coord` [D].
template <int D> HASH_HD uint32_t corner_index(const uint32_t* coord, uint32_t res, uint32_t table_size, bool dense) {
  if (dense) {
    uint32_t index = 0, stride = 1;
    for (int d = 0; d < D; ++d) {
      index += coord[d] * stride;
      stride *= res;
    }
    return index;
  }
  uint32_t h = 0;
  for (int d = 0; d < D; ++d) h ^= coord[d] * prime(d);
  return h & (table_size - 1);
}

// Where a point falls on a level: its cell, the fractions inside it, and (for the
// position gradient) whether each coordinate lay inside [0, 1].
template <int D, typename T> struct Cell {
  uint32_t cell[D];
  T frac[D];
  bool inside[D];
};

template <int D, typename T> HASH_HD Cell<D, T> locate(const T* x, T scale) {
  Cell<D, T> c;
  for (int d = 0; d < D; ++d) {
    const T xd = x[d];
    c.inside[d] = xd >= T(0) && xd <= T(1);
    const T p = (xd < T(0) ? T(0) : (xd > T(1) ? T(1) : xd)) * scale + T(0.5);
    const T fl = floor(p);
    c.cell[d] = uint32_t(fl);
    c.frac[d] = p - fl;
  }
  return c;
}

// Corner `corner` (bit d: +1 along axis d) of the cell: its table row and weight.
template <int D, typename T>
HASH_HD uint32_t corner_of(const Cell<D, T>& c, int corner, uint32_t res, uint32_t table_size, bool dense, T& weight) {
  uint32_t coord[D];
  weight = T(1);
  for (int d = 0; d < D; ++d) {
    const bool up = (corner >> d) & 1;
    coord[d] = c.cell[d] + (up ? 1u : 0u);
    weight *= up ? c.frac[d] : T(1) - c.frac[d];
  }
  return corner_index<D>(coord, res, table_size, dense);
}

// out [F] = one level's features of the point x [D]; table: that level's [table_size, F].
template <int D, int F, typename T>
HASH_HD void encode_level(const T* x, T scale, uint32_t res, uint32_t table_size, const T* table, T* out) {
  const bool dense = is_dense(D, res, table_size);
  const Cell<D, T> c = locate<D>(x, scale);
  T acc[F];
  for (int f = 0; f < F; ++f) acc[f] = T(0);
  for (int corner = 0; corner < (1 << D); ++corner) {
    T w;
    const T* row = table + uint64_t(corner_of<D>(c, corner, res, table_size, dense, w)) * F;
    for (int f = 0; f < F; ++f) acc[f] += w * row[f];
  }
  for (int f = 0; f < F; ++f) out[f] = acc[f];
}

// The VJP of encode_level for the output gradient v_out [F]: add(row_pointer, value) is
// called for every table entry the point reads (the caller chooses plain or atomic adds);
// v_x [D], when not null, gets the position gradient added.
template <int D, int F, typename T, class Add>
HASH_HD void encode_level_vjp(const T* x, T scale, uint32_t res, uint32_t table_size, const T* table,
                              const T* v_out, T* v_table, T* v_x, Add add) {
  const bool dense = is_dense(D, res, table_size);
  const Cell<D, T> c = locate<D>(x, scale);
  T v_pos[D];
  for (int d = 0; d < D; ++d) v_pos[d] = T(0);
  for (int corner = 0; corner < (1 << D); ++corner) {
    T w;
    const uint64_t row = uint64_t(corner_of<D>(c, corner, res, table_size, dense, w)) * F;
    for (int f = 0; f < F; ++f) add(v_table + row + f, w * v_out[f]);
    if (v_x != nullptr) {
      T dot = T(0);  // v_out . table[row]
      for (int f = 0; f < F; ++f) dot += v_out[f] * table[row + f];
      for (int d = 0; d < D; ++d) {  // d w / d p_d: the other axes' factors, signed by the corner's side
        T dw = ((corner >> d) & 1) ? T(1) : T(-1);
        for (int e = 0; e < D; ++e)
          if (e != d) dw *= ((corner >> e) & 1) ? c.frac[e] : T(1) - c.frac[e];
        v_pos[d] += dw * dot;
      }
    }
  }
  if (v_x != nullptr)
    for (int d = 0; d < D; ++d)
      if (c.inside[d]) v_x[d] += v_pos[d] * scale;
}

// Host side: calls run(std::integral_constant<int, D>, std::integral_constant<int, F>)
// for the dimensions (2, 3) and features per level (1, 2, 4, 8) the kernels are built
// for; false for others.
template <class Run> bool with_shape(int D, int F, Run&& run) {
  auto features = [&](auto dims) {
    switch (F) {
      case 1: run(dims, std::integral_constant<int, 1>{}); return true;
      case 2: run(dims, std::integral_constant<int, 2>{}); return true;
      case 4: run(dims, std::integral_constant<int, 4>{}); return true;
      case 8: run(dims, std::integral_constant<int, 8>{}); return true;
      default: return false;
    }
  };
  if (D == 2) return features(std::integral_constant<int, 2>{});
  if (D == 3) return features(std::integral_constant<int, 3>{});
  return false;
}

}  // namespace hashgrid
