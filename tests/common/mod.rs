//! What the core's test files share: they run natively (`cargo test`) and, unchanged, inside a
//! wasm VM under Node (`make test-wasm`, wasm-bindgen-test), so each test is declared for both.

/// Declares tests that run under both `#[test]` and `#[wasm_bindgen_test]`. The file that uses it
/// imports `wasm_bindgen_test::wasm_bindgen_test` on wasm32.
macro_rules! both {
    ($(fn $name:ident() $body:block)*) => {
        $(
            #[cfg_attr(not(target_arch = "wasm32"), test)]
            #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test)]
            fn $name() $body
        )*
    };
}
