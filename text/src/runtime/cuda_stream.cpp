// CUDA streams for concurrent PT-MoE tracks on one GPU.
//
// tch exposes no streams, so this shim goes through c10's device-generic interfaces
// (`DeviceGuardImplInterface`, `c10::Event`): libtorch's CUDA backend implements them once it
// is loaded, and nothing here needs CUDA's own headers or libraries. A stream crosses the FFI
// as c10's three numbers (id, device index, device type). Every entry point returns 0, or 1
// with the C++ exception's message in `err`.
#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

void set_error(char* err, size_t len, const char* msg) {
  if (len == 0) return;
  std::strncpy(err, msg, len - 1);
  err[len - 1] = '\0';
}

c10::Stream unpack(const int64_t* s) {
  return c10::Stream::unpack3(
      s[0], static_cast<c10::DeviceIndex>(s[1]), static_cast<c10::DeviceType>(s[2]));
}

void pack(const c10::Stream& s, int64_t* out) {
  auto d = s.pack3();
  out[0] = d.stream_id;
  out[1] = d.device_index;
  out[2] = static_cast<int64_t>(d.device_type);
}

}  // namespace

extern "C" {

// A stream from the CUDA stream pool of device `index` (written to `out[3]`).
int afm_cuda_pool_stream(int64_t index, int64_t* out, char* err, size_t len) {
  try {
    auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
    pack(impl->getStreamFromGlobalPool(dev, false), out);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
    return 1;
  }
}

// Make `stream` this thread's current stream on its device, after it waits (on the device, an
// event) for the work already queued on the thread's current stream; `prev[3]` gets that one.
int afm_cuda_enter_stream(const int64_t* stream, int64_t* prev, char* err, size_t len) {
  try {
    auto s = unpack(stream);
    auto impl = c10::impl::getDeviceGuardImpl(s.device_type());
    auto current = impl->getStream(s.device());
    c10::Event ready(s.device_type());
    ready.record(current);
    ready.block(s);
    pack(impl->exchangeStream(s), prev);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
    return 1;
  }
}

// Wait (host) until `stream` has finished its work, then make `prev` current again.
int afm_cuda_leave_stream(const int64_t* stream, const int64_t* prev, char* err, size_t len) {
  try {
    auto s = unpack(stream);
    auto impl = c10::impl::getDeviceGuardImpl(s.device_type());
    impl->synchronizeStream(s);
    impl->exchangeStream(unpack(prev));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
    return 1;
  }
}

}  // extern "C"
