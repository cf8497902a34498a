//! Certificates for the tests' TLS servers and clients (the HTTPS fake API, etcd with client
//! certificate authentication): a CA of the tests' own, made fresh for each test.
use std::{net::IpAddr, path::Path};

use anyhow::Result;

/// A CA: its PEM, and what signs the certificates it issues.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "flannel-ebpf test CA");
        let cert = params.self_signed(&key)?;
        Ok(Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// A certificate for `ip` (a server's SAN, if any) with common name `cn`, and its key.
    pub fn issue(
        &self,
        ip: Option<IpAddr>,
        cn: &str,
    ) -> Result<(rcgen::Certificate, rcgen::KeyPair)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if let Some(ip) = ip {
            params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
        }
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert, key))
    }

    /// Writes `ca.pem`, and `<name>.pem` / `<name>-key.pem` for each of `certs` (name, IP, CN),
    /// into `dir`.
    pub fn write(&self, dir: &Path, certs: &[(&str, Option<IpAddr>, &str)]) -> Result<()> {
        std::fs::write(dir.join("ca.pem"), &self.pem)?;
        for (name, ip, cn) in certs {
            let (cert, key) = self.issue(*ip, cn)?;
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
            std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem())?;
        }
        Ok(())
    }
}
