// Argument unpacking for the N-API glue. The TypeScript layer validates every
// public argument with friendly messages; these checks are the backstop for
// the invariants the kernels rely on (types, lengths, ranges), so a bad call
// from anywhere still gets a TypeError/RangeError, never a crash.
#pragma once

#include <napi.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "lowbit/quant_params.h"

namespace lowbit_binding {

[[noreturn]] inline void throw_type(Napi::Env env, const std::string& msg) {
  throw Napi::TypeError::New(env, "lowbit native: " + msg);
}
[[noreturn]] inline void throw_range(Napi::Env env, const std::string& msg) {
  throw Napi::RangeError::New(env, "lowbit native: " + msg);
}

struct Bytes {
  void* data = nullptr;
  size_t length = 0;  // elements
  napi_typedarray_type type = napi_int8_array;
};

inline Bytes typed_array(const Napi::Value& v, const char* name) {
  Napi::Env env = v.Env();
  if (!v.IsTypedArray()) throw_type(env, std::string(name) + " must be a typed array");
  // napi_get_typedarray_info (rather than Napi::ArrayBuffer, which rejects a
  // SharedArrayBuffer) gives the element pointer for shared memory too.
  Bytes b;
  size_t length = 0;
  void* data = nullptr;
  if (napi_get_typedarray_info(env, v, &b.type, &length, &data, nullptr, nullptr) != napi_ok) {
    throw_type(env, std::string(name) + " could not be read as a typed array");
  }
  b.length = length;
  b.data = data;
  if (b.data == nullptr && b.length != 0) throw_type(env, std::string(name) + " has no memory (detached?)");
  return b;
}

template <class T>
T* array_of(const Napi::Value& v, const char* name, napi_typedarray_type want, size_t* length) {
  Bytes b = typed_array(v, name);
  if (b.type != want) throw_type(v.Env(), std::string(name) + " has the wrong element type");
  *length = b.length;
  return static_cast<T*>(b.data);
}

// Int8Array or Uint8Array: one quantized code per element.
inline uint8_t* codes_of(const Napi::Value& v, const char* name, size_t* length) {
  Bytes b = typed_array(v, name);
  if (b.type != napi_int8_array && b.type != napi_uint8_array)
    throw_type(v.Env(), std::string(name) + " must be an Int8Array or Uint8Array");
  *length = b.length;
  return static_cast<uint8_t*>(b.data);
}

// Codes of the signedness the call states: reading a Uint8Array as signed would turn 255 into -1.
inline uint8_t* codes_of(const Napi::Value& v, const char* name, size_t* length, bool is_signed) {
  Bytes b = typed_array(v, name);
  if (b.type != (is_signed ? napi_int8_array : napi_uint8_array))
    throw_type(v.Env(), std::string(name) + (is_signed ? " must be an Int8Array (signed codes)" : " must be a Uint8Array (unsigned codes)"));
  *length = b.length;
  return static_cast<uint8_t*>(b.data);
}

inline size_t size_of(const Napi::Value& v, const char* name) {
  if (!v.IsNumber()) throw_type(v.Env(), std::string(name) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || std::floor(d) != d)
    throw_range(v.Env(), std::string(name) + " must be a non-negative integer");
  return size_t(d);
}

// Any number, NaN and ±Infinity included (callers check their own ranges; clip bounds may be infinite).
inline double number_of(const Napi::Value& v, const char* name) {
  if (!v.IsNumber()) throw_type(v.Env(), std::string(name) + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

inline int32_t int_of(const Napi::Value& v, const char* name) {
  if (!v.IsNumber()) throw_type(v.Env(), std::string(name) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= -2147483648.0 && d <= 2147483647.0) || std::floor(d) != d)
    throw_range(v.Env(), std::string(name) + " must be a 32-bit integer");
  return int32_t(d);
}

inline bool bool_of(const Napi::Value& v, const char* name) {
  if (!v.IsBoolean()) throw_type(v.Env(), std::string(name) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

inline std::string string_of(const Napi::Value& v, const char* name) {
  if (!v.IsString()) throw_type(v.Env(), std::string(name) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

// Whether [qmin, qmax] is a range of one 8-bit (or narrower) code type, signed or unsigned.
inline bool byte_code_range(int32_t qmin, int32_t qmax) {
  return qmin <= qmax && qmin >= -128 && qmax <= 255 && !(qmin < 0 && qmax > 127);
}

// {kind, outer, axisLen, inner, blockSize} -> QuantLayout, with the element
// count checked for overflow.
inline lowbit::QuantLayout layout_of(const Napi::Value& v) {
  Napi::Env env = v.Env();
  if (!v.IsObject()) throw_type(env, "layout must be an object");
  Napi::Object o = v.As<Napi::Object>();
  lowbit::QuantLayout l;
  int32_t kind = int_of(o.Get("kind"), "layout.kind");
  if (kind < 0 || kind > 2) throw_range(env, "layout.kind must be 0 (tensor), 1 (channel) or 2 (block)");
  l.kind = lowbit::Granularity(kind);
  l.outer = size_of(o.Get("outer"), "layout.outer");
  l.axis_len = size_of(o.Get("axisLen"), "layout.axisLen");
  l.inner = size_of(o.Get("inner"), "layout.inner");
  l.block_size = size_of(o.Get("blockSize"), "layout.blockSize");
  size_t count;
  if (__builtin_mul_overflow(l.outer, l.axis_len, &count) || __builtin_mul_overflow(count, l.inner, &count))
    throw_range(env, "layout element count overflows");
  if (l.kind == lowbit::Granularity::kTensor && (l.outer != 1 || l.axis_len != 1))
    throw_range(env, "a tensor layout has outer = axisLen = 1");
  if (l.kind == lowbit::Granularity::kBlock && l.block_size == 0)
    throw_range(env, "layout.blockSize must be >= 1 for a block layout");
  return l;
}

}  // namespace lowbit_binding
