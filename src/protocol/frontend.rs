//! Which front-end (wire) a client came through: a label on metrics, audit records and the
//! identity headers services see.

/// The three ways in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frontend {
    Uds,
    Ws,
    Grpc,
}

impl Frontend {
    pub const ALL: [Frontend; 3] = [Frontend::Uds, Frontend::Ws, Frontend::Grpc];

    pub const fn as_str(self) -> &'static str {
        match self {
            Frontend::Uds => "uds",
            Frontend::Ws => "ws",
            Frontend::Grpc => "grpc",
        }
    }
}

/// As its name (`"uds"`, `"ws"`, `"grpc"`): the form audit records and identities carry.
impl serde::Serialize for Frontend {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}
