//! Builder-style setters for the libraries' public option structs.
//!
//! Every public config, stats and option type of `qcow2`, `nbd-server` and `tunnel` is
//! `#[non_exhaustive]`, so that a field added later does not break an embedder's struct
//! literal; they are built from a constructor or `Default` and these setters instead.
//! `setters! { field: Type, ... }` inside an `impl` block makes, for each field, a documented
//! `pub fn field(self, value: Type) -> Self`. A `macro_rules!` rather than a derive crate: ten
//! lines, no proc-macro build, and the generated methods carry docs (the workspace warns on
//! missing ones).

#![no_std]

/// Inside an `impl` block: `pub fn FIELD(mut self, value: TYPE) -> Self` for each
/// `FIELD: TYPE` listed.
///
/// ```
/// #[derive(Default)]
/// #[non_exhaustive]
/// pub struct Limits { pub depth: u32, pub name: Option<&'static str> }
/// impl Limits { setters::setters! { depth: u32, name: Option<&'static str> } }
/// let l = Limits::default().depth(3).name(Some("x"));
/// assert_eq!((l.depth, l.name), (3, Some("x")));
/// ```
#[macro_export]
macro_rules! setters {
    ($($field:ident: $ty:ty),* $(,)?) => {
        $(
            #[doc = concat!("With `", stringify!($field), "` set to `value`.")]
            #[must_use]
            pub fn $field(mut self, value: $ty) -> Self {
                self.$field = value;
                self
            }
        )*
    };
}
