// N-API glue for the integer GEMM (cpp/include/lowbit/gemm.h).
// Argument order is private to ts/native.ts, which declares the same shapes.
#include <algorithm>
#include <memory>

#include "async_task.h"
#include "context.h"
#include "napi_args.h"

namespace lowbit_binding {
namespace {

using lowbit::PackedB;

// Tags the externals that hold a PackedB so no other external passes for one.
const napi_type_tag kPackedBTag = {0x6c6f776269747061ull, 0x636b656462303031ull};

struct PackedHandle {
  std::shared_ptr<PackedB> packed;
};

const std::shared_ptr<PackedB>& packed_of(const Napi::Value& v, const char* name) {
  if (!v.IsExternal() || !v.As<Napi::External<PackedHandle>>().CheckTypeTag(&kPackedBTag))
    throw_type(v.Env(), std::string(name) + " must be a packed-matrix handle");
  return v.As<Napi::External<PackedHandle>>().Data()->packed;
}

// packMatrix(b, k, n, threads) -> handle
Napi::Value PackMatrix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes b = typed_array(info[0], "b");
  if (b.type != napi_int8_array && b.type != napi_uint8_array) throw_type(env, "b must be an Int8Array or Uint8Array");
  const size_t k = size_of(info[1], "k"), n = size_of(info[2], "n");
  size_t kn;
  if (__builtin_mul_overflow(k, n, &kn) || kn != b.length) throw_range(env, "b.length must be k * n");
  auto packed = std::make_shared<PackedB>();
  Context& ctx = Context::of(env);
  lowbit::pack_b(static_cast<const uint8_t*>(b.data), k, n, b.type == napi_int8_array, packed.get(), ctx.pool.get(),
                 unsigned(size_of(info[3], "threads")));
  const int64_t bytes = int64_t(packed->bytes.size + packed->col_sums.size() * sizeof(int32_t));
  auto handle = Napi::External<PackedHandle>::New(env, new PackedHandle{packed}, [bytes](Napi::Env e, PackedHandle* h) {
    Napi::MemoryManagement::AdjustExternalMemory(e, -bytes);
    delete h;
  });
  handle.TypeTag(&kPackedBTag);
  Napi::MemoryManagement::AdjustExternalMemory(env, bytes);
  return handle;
}

// matmulInt8(a, b | handle, m, k, n, aZeroPoint, bZeroPoint: Int32Array, bZeroPointPerColumn, out: Int32Array, kernel, threads)
struct MatmulCall {
  lowbit::GemmArgs args{};
  const uint8_t* b_bytes = nullptr;
  bool b_signed = true;
  std::shared_ptr<PackedB> packed;  // keeps a packed B alive during async work
  const lowbit::GemmKernel* kernel = nullptr;  // null: scalar reference
  lowbit::ThreadPool* pool = nullptr;
  unsigned threads = 0;

  explicit MatmulCall(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Bytes a = typed_array(info[0], "a");
    if (a.type != napi_int8_array && a.type != napi_uint8_array) throw_type(env, "a must be an Int8Array or Uint8Array");
    args.a = static_cast<const uint8_t*>(a.data);
    args.a_signed = a.type == napi_int8_array;
    args.m = size_of(info[2], "m");
    args.k = size_of(info[3], "k");
    args.n = size_of(info[4], "n");
    size_t mk, kn, mn;
    if (__builtin_mul_overflow(args.m, args.k, &mk) || __builtin_mul_overflow(args.k, args.n, &kn) ||
        __builtin_mul_overflow(args.m, args.n, &mn))
      throw_range(env, "m, k, n overflow");
    if (a.length != mk) throw_range(env, "a.length must be m * k");
    if (info[1].IsExternal()) {
      packed = packed_of(info[1], "b");
      if (packed->k != args.k || packed->n != args.n) throw_range(env, "the packed b has other dimensions");
      b_signed = packed->b_signed;
    } else {
      Bytes b = typed_array(info[1], "b");
      if (b.type != napi_int8_array && b.type != napi_uint8_array) throw_type(env, "b must be an Int8Array or Uint8Array");
      if (b.length != kn) throw_range(env, "b.length must be k * n");
      b_bytes = static_cast<const uint8_t*>(b.data);
      b_signed = b.type == napi_int8_array;
    }
    args.a_zero_point = int_of(info[5], "aZeroPoint");
    size_t nz, nc;
    args.b_zero_point = array_of<int32_t>(info[6], "bZeroPoint", napi_int32_array, &nz);
    args.b_zp_per_column = bool_of(info[7], "bZeroPointPerColumn");
    if (nz != (args.b_zp_per_column ? args.n : 1) || nz == 0) throw_range(env, "bZeroPoint has the wrong length");
    // Zero points of 8-bit codes: the kernels' offset arithmetic stays far from int32 overflow.
    const auto is_code = [](int32_t z) { return byte_code_range(z, z); };
    if (!is_code(args.a_zero_point) || !std::all_of(args.b_zero_point, args.b_zero_point + nz, is_code))
      throw_range(env, "zero points must be in [-128, 255]");
    args.c = array_of<int32_t>(info[8], "out", napi_int32_array, &nc);
    if (nc < mn) throw_range(env, "out is too small");
    Context& ctx = Context::of(env);
    kernel = ctx.gemm_kernel(env, string_of(info[9], "kernel"));
    pool = ctx.pool.get();
    threads = unsigned(size_of(info[10], "threads"));
  }

  double run() const {
    if (args.m == 0 || args.n == 0) return 0;
    if (args.k == 0) {
      std::fill_n(args.c, args.m * args.n, 0);
      return 0;
    }
    if (!kernel) {  // the scalar reference works on unpacked B
      if (b_bytes) {
        lowbit::gemm_reference(args, b_bytes, b_signed, pool, threads);
      } else {
        std::vector<uint8_t> unpacked(args.k * args.n);
        lowbit::unpack_b(*packed, unpacked.data());
        lowbit::gemm_reference(args, unpacked.data(), b_signed, pool, threads);
      }
      return 0;
    }
    if (packed) {
      lowbit::gemm_packed(*kernel, args, *packed, pool, threads);
    } else {
      PackedB temp;
      lowbit::pack_b(b_bytes, args.k, args.n, b_signed, &temp, pool, threads);
      lowbit::gemm_packed(*kernel, args, temp, pool, threads);
    }
    return 0;
  }
};

Napi::Value MatmulInt8(const Napi::CallbackInfo& info) {
  MatmulCall(info).run();
  return info.Env().Undefined();
}

Napi::Value MatmulInt8Async(const Napi::CallbackInfo& info) {
  auto call = std::make_shared<MatmulCall>(info);
  return AsyncTask::Start(info.Env(), {info[0], info[1], info[6], info[8]}, [call] { return call->run(); });
}

// int32ToFloat(c, m, n, aScale, bScale: Float32Array, perColumn, bias: Float32Array | null, y)
Napi::Value Int32ToFloat(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nc, ns, ny, nb = 0;
  const int32_t* c = array_of<int32_t>(info[0], "c", napi_int32_array, &nc);
  const size_t m = size_of(info[1], "m"), n = size_of(info[2], "n");
  const float a_scale = float(info[3].As<Napi::Number>().DoubleValue());
  const float* b_scale = array_of<float>(info[4], "bScale", napi_float32_array, &ns);
  const bool per_column = bool_of(info[5], "perColumn");
  const float* bias = info[6].IsNull() ? nullptr : array_of<float>(info[6], "bias", napi_float32_array, &nb);
  float* y = array_of<float>(info[7], "y", napi_float32_array, &ny);
  size_t mn;  // m * n can wrap (each may be up to 2^53): checked like matmulInt8's
  if (__builtin_mul_overflow(m, n, &mn) || nc < mn || ny < mn || ns != (per_column ? n : 1) || (bias && nb != n))
    throw_range(env, "int32ToFloat: bad lengths");
  lowbit::int32_to_float(c, m, n, a_scale, b_scale, per_column, bias, y);
  return env.Undefined();
}

// requantizeInt32(c, m, n, aScale, bScale, perColumn, yScale, yZeroPoint, qmin, qmax, relu, y)
Napi::Value RequantizeInt32(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nc, ns, ny;
  const int32_t* c = array_of<int32_t>(info[0], "c", napi_int32_array, &nc);
  const size_t m = size_of(info[1], "m"), n = size_of(info[2], "n");
  const float a_scale = float(info[3].As<Napi::Number>().DoubleValue());
  const float* b_scale = array_of<float>(info[4], "bScale", napi_float32_array, &ns);
  const bool per_column = bool_of(info[5], "perColumn");
  const float y_scale = float(info[6].As<Napi::Number>().DoubleValue());
  const int32_t y_zp = int_of(info[7], "yZeroPoint"), qmin = int_of(info[8], "qmin"), qmax = int_of(info[9], "qmax");
  const bool relu = bool_of(info[10], "relu");
  uint8_t* y = codes_of(info[11], "y", &ny);
  size_t mn;
  if (__builtin_mul_overflow(m, n, &mn) || nc < mn || ny < mn || ns != (per_column ? n : 1)) throw_range(env, "requantizeInt32: bad lengths");
  // Codes are stored in bytes: an 8-bit range (qmax - yZeroPoint must not overflow either).
  if (!byte_code_range(qmin, qmax) || y_zp < qmin || y_zp > qmax) throw_range(env, "requantizeInt32: bad range");
  lowbit::requantize_int32(c, m, n, a_scale, b_scale, per_column, y_scale, y_zp, qmin, qmax, relu, y);
  return env.Undefined();
}

const napi_type_tag kPackedB4Tag = {0x6c6f776269747034ull, 0x636b656462343031ull};

struct PackedHandle4 {
  std::shared_ptr<lowbit::PackedB4> packed;
};

// packInt4Matrix(values, k, n, blockSize, scale, zeroPoint, threads) -> handle, or the index of a bad value
Napi::Value PackInt4Matrix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nv, ns, nz;
  const uint8_t* values = codes_of(info[0], "values", &nv);
  const bool is_signed = typed_array(info[0], "values").type == napi_int8_array;
  const size_t k = size_of(info[1], "k"), n = size_of(info[2], "n"), block = size_of(info[3], "blockSize");
  const float* scale = array_of<float>(info[4], "scale", napi_float32_array, &ns);
  const int32_t* zp = array_of<int32_t>(info[5], "zeroPoint", napi_int32_array, &nz);
  // The kernels take a block's 4-value groups in pairs (PackedB4::block_groups is even).
  if (block == 0 || block % 8 != 0) throw_range(env, "blockSize must be a positive multiple of 8");
  size_t kn;
  if (__builtin_mul_overflow(k, n, &kn) || kn != nv) throw_range(env, "values.length must be k * n");
  const size_t blocks = (k + block - 1) / block;
  if (ns != blocks * n || nz != blocks * n) throw_range(env, "scale and zeroPoint need ceil(k / blockSize) * n entries");
  auto packed = std::make_shared<lowbit::PackedB4>();
  Context& ctx = Context::of(env);
  const int64_t bad = lowbit::pack_b_int4(values, k, n, is_signed, block, scale, zp, packed.get(), ctx.pool.get(),
                                          unsigned(size_of(info[6], "threads")));
  if (bad >= 0) return Napi::Number::New(env, double(bad));
  const int64_t bytes = int64_t(packed->nibbles.size + packed->scale.size() * 12 + packed->col_sums.size() * 4);
  auto handle = Napi::External<PackedHandle4>::New(env, new PackedHandle4{packed}, [bytes](Napi::Env e, PackedHandle4* h) {
    Napi::MemoryManagement::AdjustExternalMemory(e, -bytes);
    delete h;
  });
  handle.TypeTag(&kPackedB4Tag);
  Napi::MemoryManagement::AdjustExternalMemory(env, bytes);
  return handle;
}

// matmulInt4(a, handle, m, aZeroPoint, aScale, out: Float32Array, kernel, threads)
Napi::Value MatmulInt4(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t na, ny;
  const uint8_t* a = codes_of(info[0], "a", &na);
  const bool a_signed = typed_array(info[0], "a").type == napi_int8_array;
  if (!info[1].IsExternal() || !info[1].As<Napi::External<PackedHandle4>>().CheckTypeTag(&kPackedB4Tag))
    throw_type(env, "b must be a packed int4 matrix handle");
  const auto packed = info[1].As<Napi::External<PackedHandle4>>().Data()->packed;
  const size_t m = size_of(info[2], "m");
  const int32_t azp = int_of(info[3], "aZeroPoint");
  const float a_scale = float(info[4].As<Napi::Number>().DoubleValue());
  float* y = array_of<float>(info[5], "out", napi_float32_array, &ny);
  size_t mk, mn;
  if (__builtin_mul_overflow(m, packed->k, &mk) || mk != na) throw_range(env, "a.length must be m * k");
  if (__builtin_mul_overflow(m, packed->n, &mn) || ny < mn) throw_range(env, "out is too small");
  Context& ctx = Context::of(env);
  const lowbit::GemmKernel* kernel = ctx.gemm_kernel(env, string_of(info[6], "kernel"));
  const unsigned threads = unsigned(size_of(info[7], "threads"));
  lowbit::Int4Args args{a, a_signed, m, azp, a_scale, y};
  if (kernel) lowbit::gemm_int4(*kernel, args, *packed, ctx.pool.get(), threads);
  else lowbit::gemm_int4_reference(args, *packed, ctx.pool.get(), threads);
  return env.Undefined();
}

}  // namespace

void register_gemm_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("packMatrix", Napi::Function::New(env, PackMatrix, "packMatrix"));
  exports.Set("matmulInt8", Napi::Function::New(env, MatmulInt8, "matmulInt8"));
  exports.Set("matmulInt8Async", Napi::Function::New(env, MatmulInt8Async, "matmulInt8Async"));
  exports.Set("packInt4Matrix", Napi::Function::New(env, PackInt4Matrix, "packInt4Matrix"));
  exports.Set("matmulInt4", Napi::Function::New(env, MatmulInt4, "matmulInt4"));
  exports.Set("int32ToFloat", Napi::Function::New(env, Int32ToFloat, "int32ToFloat"));
  exports.Set("requantizeInt32", Napi::Function::New(env, RequantizeInt32, "requantizeInt32"));
}

}  // namespace lowbit_binding
