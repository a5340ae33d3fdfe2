// The op library's own Python, for processes that run none: Triton's TensorFlow backend, TF Serving and C++ loaders
// load only the op library, so the first lookup that finds no callback starts the interpreter the library was built
// with and imports `interop.tf_op.serve`, which registers the callback (and later starts the server from the graph's
// ps_config_file). In a Python process that never imported the plugin the running interpreter is used instead.
//
// The Python C API is resolved at run time (dlsym), never linked: a Python process keeps its own interpreter and a
// process without one loads libpython only when a lookup needs it. The headers fix the ABI (PyConfig's layout), so
// the library runs with the Python it was built against: build.py records that Python's library, executable and the
// directory holding `interop` as HPS_PYTHON_LIBRARY / HPS_PYTHON_EXECUTABLE / HPS_PYTHON_PATH.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>

#include <mutex>
#include <string>

#ifndef HPS_PYTHON_LIBRARY
#error "build.py defines HPS_PYTHON_LIBRARY, HPS_PYTHON_EXECUTABLE and HPS_PYTHON_PATH"
#endif

namespace hps {

// The Python C API functions used here, looked up in the process (a Python process) or in HPS_PYTHON_LIBRARY.
struct PythonApi {
  decltype(&Py_IsInitialized) is_initialized = nullptr;
  decltype(&PyConfig_InitPythonConfig) config_init = nullptr;
  decltype(&PyConfig_SetBytesString) config_set_bytes = nullptr;
  decltype(&PyConfig_Clear) config_clear = nullptr;
  decltype(&Py_InitializeFromConfig) initialize = nullptr;
  decltype(&PyStatus_Exception) status_exception = nullptr;
  decltype(&PyEval_SaveThread) save_thread = nullptr;
  decltype(&PyGILState_Ensure) gil_ensure = nullptr;
  decltype(&PyGILState_Release) gil_release = nullptr;
  decltype(&PyImport_ImportModule) import_module = nullptr;
  decltype(&PyObject_CallMethod) call_method = nullptr;
  decltype(&PyErr_Fetch) err_fetch = nullptr;
  decltype(&PyObject_Str) str = nullptr;
  decltype(&PyUnicode_AsUTF8) as_utf8 = nullptr;
  decltype(&Py_DecRef) dec_ref = nullptr;
  decltype(&PySys_GetObject) sys_get = nullptr;
  decltype(&PyList_Insert) list_insert = nullptr;
  decltype(&PyUnicode_FromString) from_string = nullptr;
  decltype(&PyRun_SimpleStringFlags) run_string = nullptr;

  // Empty on success, else what is missing.
  std::string Resolve(void* handle) {
    std::string missing;
    const auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(handle, name));
      if (fn == nullptr) missing += std::string(missing.empty() ? "" : ", ") + name;
    };
    get(is_initialized, "Py_IsInitialized");
    get(config_init, "PyConfig_InitPythonConfig");
    get(config_set_bytes, "PyConfig_SetBytesString");
    get(config_clear, "PyConfig_Clear");
    get(initialize, "Py_InitializeFromConfig");
    get(status_exception, "PyStatus_Exception");
    get(save_thread, "PyEval_SaveThread");
    get(gil_ensure, "PyGILState_Ensure");
    get(gil_release, "PyGILState_Release");
    get(import_module, "PyImport_ImportModule");
    get(call_method, "PyObject_CallMethod");
    get(err_fetch, "PyErr_Fetch");
    get(str, "PyObject_Str");
    get(as_utf8, "PyUnicode_AsUTF8");
    get(dec_ref, "Py_DecRef");
    get(sys_get, "PySys_GetObject");
    get(list_insert, "PyList_Insert");
    get(from_string, "PyUnicode_FromString");
    get(run_string, "PyRun_SimpleStringFlags");
    return missing.empty() ? missing : "missing Python C API symbols: " + missing;
  }

  // The pending Python exception as text (cleared).
  std::string TakeError() {
    PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
    err_fetch(&type, &value, &traceback);
    std::string text = "unknown Python error";
    PyObject* shown = value != nullptr ? value : type;
    if (shown != nullptr) {
      PyObject* s = str(shown);
      const char* utf8 = s != nullptr ? as_utf8(s) : nullptr;
      if (utf8 != nullptr) text = utf8;
      if (s != nullptr) dec_ref(s);
    }
    for (PyObject* o : {type, value, traceback}) {
      if (o != nullptr) dec_ref(o);
    }
    return text;
  }
};

// Imports interop.tf_op.serve and attaches it to the op library at library_path. Holds the GIL.
inline std::string AttachServeModule(PythonApi& py, const char* library_path) {
  PyObject* path = py.sys_get("path");  // borrowed
  if (path != nullptr && HPS_PYTHON_PATH[0] != '\0') {
    PyObject* entry = py.from_string(HPS_PYTHON_PATH);
    if (entry != nullptr) {
      py.list_insert(path, 0, entry);
      py.dec_ref(entry);
    }
  }
  PyObject* module = py.import_module("interop.tf_op.serve");
  if (module == nullptr) return "import interop.tf_op.serve failed: " + py.TakeError();
  PyObject* done = py.call_method(module, "attach", "s", library_path);
  py.dec_ref(module);
  if (done == nullptr) return "interop.tf_op.serve.attach failed: " + py.TakeError();
  py.dec_ref(done);
  return {};
}

inline std::string StartServeModule(const void* symbol_in_this_library) {
  Dl_info info{};
  if (dladdr(symbol_in_this_library, &info) == 0 || info.dli_fname == nullptr) {
    return "dladdr could not name the op library";
  }
  PythonApi py;
  void* handle = RTLD_DEFAULT;
  const bool in_process = dlsym(RTLD_DEFAULT, "Py_IsInitialized") != nullptr;
  if (HPS_PYTHON_LIBRARY[0] == '\0' && !in_process) {
    return "the Python this library was built with has no shared library (built without --enable-shared)";
  }
  if (!in_process) {
    // RTLD_GLOBAL: the extension modules the engine imports (torch, numpy) resolve the C API from it.
    handle = dlopen(HPS_PYTHON_LIBRARY, RTLD_NOW | RTLD_GLOBAL);
    if (handle == nullptr) return std::string("cannot load ") + HPS_PYTHON_LIBRARY + ": " + dlerror();
  }
  std::string problem = py.Resolve(handle);
  if (!problem.empty()) return problem;
  if (py.is_initialized()) {
    const PyGILState_STATE state = py.gil_ensure();
    problem = AttachServeModule(py, info.dli_fname);
    py.gil_release(state);
    return problem;
  }
  // A process without Python: start the build's interpreter. Its executable as the program name makes Python find
  // the same prefix and site-packages (a venv's pyvenv.cfg included); PYTHONPATH and friends still apply.
  PyConfig config;
  py.config_init(&config);
  config.install_signal_handlers = 0;  // the host process owns its signals
  config.parse_argv = 0;
  PyStatus status = py.config_set_bytes(&config, &config.program_name, HPS_PYTHON_EXECUTABLE);
  if (!py.status_exception(status)) status = py.initialize(&config);
  py.config_clear(&config);
  if (py.status_exception(status)) {
    return std::string("cannot start Python (") + HPS_PYTHON_EXECUTABLE + "): " +
           (status.err_msg != nullptr ? status.err_msg : "unknown error");
  }
  // NOTE: a process linked against libtensorflow_cc has TF's BoringSSL symbols in its global scope, and they
  // interpose on the system OpenSSL's own calls: importing Python's _hashlib then crashes inside libcrypto
  // (measured with tests/interop/serve_savedmodel.c). hashlib falls back to its built-in digests without _hashlib,
  // and nothing on the lookup path needs ssl.
  if (py.run_string("import sys\nsys.modules['_hashlib'] = None\nsys.modules['_ssl'] = None\n", nullptr) != 0) {
    problem = "could not prepare the embedded interpreter";
  } else {
    problem = AttachServeModule(py, info.dli_fname);
  }
  py.save_thread();  // the interpreter stays for the process; the callback takes the GIL on each call
  return problem;
}

// Once per process: empty when the serve module attached, else why not (the same answer on every later call).
inline std::string EnsureServeModule(const void* symbol_in_this_library) {
  static std::once_flag once;
  static std::string problem;
  std::call_once(once, [&] { problem = StartServeModule(symbol_in_this_library); });
  return problem;
}

}  // namespace hps
