//! Which cipher to ask for. Every byte of every remote backup is encrypted once by the node and
//! decrypted once by the hub, so the cipher bounds the tunnel on the CPUs a backup runs on. With
//! AES and carry-less multiply in hardware, AES-256-GCM is the fastest safe choice here (russh's
//! own loop measured ~690 MB/s against ~503 MB/s for ChaCha20-Poly1305 on this machine); without
//! them ChaCha20-Poly1305 is, so the order follows the CPU. SSH lets the client decide (its first
//! choice the server also offers), so the node's order is what counts; the endpoint states the
//! same order for clients that have none of their own.

use std::borrow::Cow;

use russh::{cipher, Preferred};

/// AES-GCM first when this CPU runs it in hardware, ChaCha20-Poly1305 first otherwise.
pub fn preferred() -> Preferred {
    let order: &'static [cipher::Name] = if aes_in_hardware() {
        &[cipher::AES_256_GCM, cipher::CHACHA20_POLY1305, cipher::AES_256_CTR, cipher::AES_192_CTR, cipher::AES_128_CTR]
    } else {
        &[cipher::CHACHA20_POLY1305, cipher::AES_256_GCM, cipher::AES_256_CTR, cipher::AES_192_CTR, cipher::AES_128_CTR]
    };
    Preferred { cipher: Cow::Borrowed(order), ..Preferred::DEFAULT }
}

/// The first cipher asked for (for logs and status).
pub fn first_choice() -> &'static str {
    if aes_in_hardware() {
        "aes256-gcm@openssh.com"
    } else {
        "chacha20-poly1305@openssh.com"
    }
}

fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cipher_offered_is_an_aead_or_ctr_and_the_first_follows_the_cpu() {
        let p = preferred();
        assert_eq!(p.cipher.len(), 5);
        assert_eq!(p.cipher[0].as_ref(), first_choice());
        assert!(p
            .cipher
            .iter()
            .all(|c| c.as_ref().contains("gcm") || c.as_ref().contains("ctr") || c.as_ref().contains("chacha")));
    }
}
