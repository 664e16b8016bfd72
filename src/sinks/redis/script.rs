//! The compare-and-set script every document write runs, and how its reply is read.

use redis::Value;

use super::SinkError;
use super::errors::unexpected;

/// The compare-and-set of many documents in one command (on a cluster, of one document: a
/// command may not cross slots). The stored token sits at the very end of a document
/// (`..."_rev":123}`), so the script reads it from the last bytes without parsing the JSON;
/// "0" stands for an absent key. A document's finished streams join the set of them in the
/// same script (atomic with the document).
///
/// With `appendfsync always`, Redis syncs its log once per event-loop turn that executed a
/// write, and a turn reads 16 KB of a client's pipeline: a chunk sent as one script per
/// document was synced a dozen times or more, each sync 13 ms at the median and up to 145 ms
/// while the other servers wrote (`LATENCY HISTORY aof-fsync-always`). As one command it
/// runs, and is synced, once.
///
/// Per document, in order: KEYS its key, then its finished set if it has finished streams;
/// ARGV the expected token, the body, the number n of finished streams, then those n. The
/// reply has one element per document: 1 written, 0 the token moved on, or the error that
/// document alone met (`pcall`: the others are still written).
pub(super) const CAS_MANY: &str = r#"
local out = {}
local k, a = 1, 1
local function failed(r) return type(r) == 'table' and r.err end
while a <= #ARGV do
  local key, expected, body, n = KEYS[k], ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  k = k + 1
  a = a + 3
  local side = nil
  if n > 0 then
    side = KEYS[k]
    k = k + 1
  end
  local cur = redis.pcall('GET', key)
  local verdict = 1
  if failed(cur) then
    verdict = cur
  else
    local rev = '0'
    if cur then
      rev = string.match(string.sub(cur, -40), '"_rev":(%d+)}$') or '?'
    end
    if rev ~= expected then
      verdict = 0
    else
      local r = redis.pcall('SET', key, body)
      if failed(r) then
        verdict = r
      elseif side then
        for i = a, a + n - 1, 500 do
          r = redis.pcall('SADD', side, unpack(ARGV, i, math.min(i + 499, a + n - 1)))
          if failed(r) then
            verdict = r
            break
          end
        end
      end
    end
  end
  out[#out + 1] = verdict
  a = a + n
end
return out"#;

/// One reply per document from the reply of a [`CAS_MANY`] chunk of `n`. An error for the
/// whole command (out of memory, say) is every document's.
pub(super) fn per_document(reply: Value, n: usize) -> Result<Vec<Value>, SinkError> {
    match reply {
        Value::Array(v) if v.len() == n => Ok(v),
        Value::ServerError(e) => Ok(vec![Value::ServerError(e); n]),
        other => Err(unexpected(format!(
            "{n} documents written, the script answered {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_reply_is_one_verdict_per_document() {
        let v = per_document(Value::Array(vec![Value::Int(1), Value::Int(0)]), 2).unwrap();
        assert_eq!(v, vec![Value::Int(1), Value::Int(0)]);
        // Refused as a whole (out of memory, say): every document's error.
        let err = redis::parse_redis_value(b"-OOM command not allowed\r\n").unwrap();
        assert!(matches!(err, Value::ServerError(_)), "{err:?}");
        let v = per_document(err.clone(), 3).unwrap();
        assert_eq!(v, vec![err.clone(), err.clone(), err]);
        // Any other shape, or a count that does not match, is not guessed at.
        assert!(per_document(Value::Array(vec![Value::Int(1)]), 2).is_err());
        assert!(per_document(Value::Nil, 1).is_err());
    }
}
