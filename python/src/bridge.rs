//! `tch::Tensor` ↔ `torch.Tensor` without copies: both sides hold the same C++ `at::Tensor`
//! (libtorch_python's `THPVariable_Wrap` / `THPVariable_Unpack`, through tch's
//! `python-extension` feature), so storage, device, dtype and autograd state are shared.

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;

/// A torch.Tensor argument, seen from Rust as a `tch::Tensor` sharing its storage.
pub struct PyTensor(pub tch::Tensor);

impl<'py> FromPyObject<'py> for PyTensor {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let ptr = ob.as_ptr() as *mut tch::python::CPyObject;
        // SAFETY: `ptr` is a live Python object (we hold a reference and the GIL).
        let tensor = unsafe { tch::Tensor::pyobject_unpack(ptr) }.map_err(torch_err)?;
        match tensor {
            Some(t) => Ok(PyTensor(t)),
            None => Err(PyTypeError::new_err(format!(
                "expected a torch.Tensor, got {}",
                ob.get_type().name()?
            ))),
        }
    }
}

/// A `torch.Tensor` sharing `t`'s storage (no copy, on any device).
pub fn to_py(py: Python<'_>, t: &tch::Tensor) -> PyResult<PyObject> {
    let ptr = t.pyobject_wrap().map_err(torch_err)?;
    if ptr.is_null() {
        return Err(PyErr::take(py)
            .unwrap_or_else(|| PyRuntimeError::new_err("torch: cannot wrap the tensor")));
    }
    // SAFETY: THPVariable_Wrap returns a new reference.
    Ok(unsafe { PyObject::from_owned_ptr(py, ptr as *mut pyo3::ffi::PyObject) })
}

pub fn torch_err(e: tch::TchError) -> PyErr {
    PyRuntimeError::new_err(format!("libtorch: {e}"))
}
