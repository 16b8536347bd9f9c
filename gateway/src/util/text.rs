//! Strings other people control (a peer's agent version, a server's error
//! text), made safe to print on a terminal: no escape sequences, no line
//! breaks, no bidi overrides, and a bounded length.

/// How many characters of a remote string a line of CLI output shows.
pub const REMOTE_MAX_CHARS: usize = 128;

/// How many characters of a remote error message a line shows: errors carry
/// a cause chain and a URL, so they get more room than a name.
pub const REMOTE_ERROR_MAX_CHARS: usize = 512;

/// `text` with every character a terminal would act on replaced by U+FFFD,
/// cut to `max_chars` characters (a cut shows as a trailing `…`).
///
/// A remote peer chooses its identify agent string freely; printed raw, an
/// ESC could rewrite the screen, a CR or newline forge another output line,
/// and a bidi override make the text read differently from its bytes.
pub fn for_terminal(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_mul(4)));
    for (i, c) in text.chars().enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        out.push(if is_unsafe(c) {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        });
    }
    out
}

/// C0 and C1 controls and DEL (`char::is_control`), the line and paragraph
/// separators, and the bidirectional formatting characters (embeddings,
/// overrides, isolates and marks).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}'             // line, paragraph separator
            | '\u{061C}'                        // Arabic letter mark
            | '\u{200E}' | '\u{200F}'           // LRM, RLM
            | '\u{202A}'..='\u{202E}'           // LRE, RLE, PDF, LRO, RLO
            | '\u{2066}'..='\u{2069}' // LRI, RLI, FSI, PDI
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_ordinary_agent_strings_as_they_are() {
        for s in [
            "kubo/0.29.0/",
            "rust-ipfs/0.11 (nixpfs)",
            "héllo wörld ✓",
            "",
        ] {
            assert_eq!(for_terminal(s, REMOTE_MAX_CHARS), s);
        }
    }

    #[test]
    fn replaces_escapes_line_breaks_and_c1_controls() {
        let s = "a\u{1b}[2Jb\rc\nd\te\u{7f}f\u{9b}31mg\u{85}h\0i";
        assert_eq!(
            for_terminal(s, REMOTE_MAX_CHARS),
            "a\u{fffd}[2Jb\u{fffd}c\u{fffd}d\u{fffd}e\u{fffd}f\u{fffd}31mg\u{fffd}h\u{fffd}i"
        );
    }

    #[test]
    fn replaces_bidi_overrides_isolates_marks_and_separators() {
        let s = "x\u{202e}gpj.exe\u{202c}\u{2066}\u{2069}\u{200f}\u{061c}\u{2028}\u{2029}y";
        let out = for_terminal(s, REMOTE_MAX_CHARS);
        assert_eq!(out, format!("x\u{fffd}gpj.exe{}y", "\u{fffd}".repeat(7)));
    }

    #[test]
    fn caps_the_length_in_characters_and_marks_the_cut() {
        let long = "é".repeat(1000);
        let out = for_terminal(&long, REMOTE_MAX_CHARS);
        assert_eq!(out.chars().count(), REMOTE_MAX_CHARS + 1);
        assert!(out.ends_with('…'));
        let exact = "a".repeat(REMOTE_MAX_CHARS);
        assert_eq!(for_terminal(&exact, REMOTE_MAX_CHARS), exact);
    }

    #[test]
    fn output_never_holds_a_control_character() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let out = for_terminal(&all, usize::MAX);
        assert!(!out.chars().any(is_unsafe), "{out:?}");
        assert_eq!(out.chars().count(), all.chars().count());
    }
}
