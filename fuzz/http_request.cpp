// Fuzz target: the HTTP/1.1 request head parser (dmz::http::parse_request), the first thing
// that reads a client's bytes. Besides "no crash", it checks what sessions rely on:
// - a head that parses gives views into its own bytes, head_size within the input and
//   ending in CRLF CRLF, token method, origin-form or '*' target, clean field values;
// - the same head parses the same when it arrives in two pieces (every proper prefix is
//   need_more), with bytes after it, and into a head object reused from earlier requests;
// - an error is final: once a prefix is refused, the whole input is refused too;
// - tighter limits only refuse more: what parses under them parses the same without them.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "check.hpp"
#include "dmz/proxy/http/parser.hpp"

namespace {

using namespace dmz::http;
using dmz::fuzz::within;

/// Everything a parse produced, as text, to compare two parses.
std::string summary(const request_head& h) {
    std::string s;
    s += h.method;
    s += ' ';
    s += h.target;
    s += ' ';
    s += h.authority;
    s += ' ';
    s += std::to_string(h.version_minor);
    s += '|';
    s += h.host;
    s += '|';
    s += std::to_string(static_cast<int>(h.body)) + ',' + std::to_string(h.content_length) + ',' +
         std::to_string(h.keep_alive) + std::to_string(h.expect_continue) + std::to_string(h.upgrade) + ',' +
         std::to_string(h.head_size);
    for (auto& f : h.fields) {
        s += '\n';
        s += f.name;
        s += ':';
        s += f.value;
        s += '#';
        s += std::to_string(static_cast<int>(f.id));
    }
    for (auto& t : h.connection_tokens) s += "\nconn " + t;
    return s;
}

bool clean_value(std::string_view v) {
    if (!v.empty() && (v.front() == ' ' || v.front() == '\t' || v.back() == ' ' || v.back() == '\t')) return false;
    for (unsigned char c : v)
        if ((c < 0x20 && c != '\t') || c == 0x7f) return false;
    return true;
}

void check_done(std::string_view in, const limits& lim, const request_head& h) {
    DMZ_FUZZ_CHECK(h.head_size >= 4 && h.head_size <= in.size());
    auto head = in.substr(0, h.head_size);
    DMZ_FUZZ_CHECK(head.ends_with("\r\n\r\n"));
    DMZ_FUZZ_CHECK(h.head_size <= lim.max_head_bytes);
    DMZ_FUZZ_CHECK(is_token(h.method) && within(h.method, head));
    DMZ_FUZZ_CHECK(!h.target.empty());
    DMZ_FUZZ_CHECK(h.target.front() == '/' || (h.target == "*" && h.method == "OPTIONS"));
    DMZ_FUZZ_CHECK(within(h.target, head) || h.target == "/");  // "/" for "http://host"
    for (unsigned char c : h.target) DMZ_FUZZ_CHECK(c > 0x20 && c < 0x7f);
    DMZ_FUZZ_CHECK(within(h.authority, head) && within(h.host, head));
    DMZ_FUZZ_CHECK(h.version_minor == 0 || h.version_minor == 1);
    DMZ_FUZZ_CHECK(h.fields.size() <= lim.max_fields);
    for (auto& f : h.fields) {
        DMZ_FUZZ_CHECK(is_token(f.name) && within(f.name, head) && within(f.value, head));
        DMZ_FUZZ_CHECK(f.id == classify_field(f.name));
        DMZ_FUZZ_CHECK(clean_value(f.value));
    }
    auto hosts = h.count(field_id::host);
    DMZ_FUZZ_CHECK(hosts <= 1 && (h.version_minor == 0 || hosts == 1));
    DMZ_FUZZ_CHECK(h.body != body_kind::until_close);  // a request body is never close-delimited
    DMZ_FUZZ_CHECK((h.body == body_kind::length) == (h.content_length > 0));
    DMZ_FUZZ_CHECK(!(h.body == body_kind::chunked && h.version_minor == 0));
    DMZ_FUZZ_CHECK(!h.expect_continue || h.version_minor == 1);
    DMZ_FUZZ_CHECK(!(h.count(field_id::content_length) && h.count(field_id::transfer_encoding)));
    for (auto& t : h.connection_tokens)
        for (char c : t) DMZ_FUZZ_CHECK(!(c >= 'A' && c <= 'Z'));
}

void check_error(const parse_error& err) {
    DMZ_FUZZ_CHECK(!err.code.empty() && !err.detail.empty());
    int s = err.status;
    DMZ_FUZZ_CHECK(s == 400 || s == 405 || s == 414 || s == 417 || s == 431 || s == 501 || s == 505);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    dmz::fuzz::lcg rng(in);
    const limits lim;
    // Tighter than any listener would set, to reach the limit paths with short inputs.
    limits tight;
    tight.max_request_line = 64;
    tight.max_head_bytes = 512;
    tight.max_fields = 8;

    request_head h;
    parse_error err;
    auto r = parse_request(in, lim, h, err);
    if (r == result::error) check_error(err);
    if (r == result::need_more) DMZ_FUZZ_CHECK(in.size() <= lim.max_head_bytes);

    // An error is final: a refused prefix means a refused whole.
    {
        auto k = rng.below(size + 1);
        request_head hp;
        parse_error ep;
        auto rp = parse_request(in.substr(0, k), lim, hp, ep);
        if (rp == result::error) {
            check_error(ep);
            DMZ_FUZZ_CHECK(r == result::error);
        }
    }

    // Tighter limits refuse more, never accept differently.
    {
        request_head ht;
        parse_error et;
        auto rt = parse_request(in, tight, ht, et);
        if (rt == result::done) {
            DMZ_FUZZ_CHECK(r == result::done);
            check_done(in, tight, ht);
            DMZ_FUZZ_CHECK(summary(ht) == summary(h));
        }
        if (r == result::error) DMZ_FUZZ_CHECK(rt == result::error);
    }

    if (r != result::done) return 0;
    check_done(in, lim, h);
    auto expect = summary(h);

    // The head alone, without what follows it, parses the same.
    {
        request_head h2;
        parse_error e2;
        DMZ_FUZZ_CHECK(parse_request(in.substr(0, h.head_size), lim, h2, e2) == result::done);
        DMZ_FUZZ_CHECK(summary(h2) == expect);
    }
    // Two pieces: the first is need_more, at the last byte, mid-way and at a point the
    // input chooses; then the whole parses the same.
    for (std::size_t k : {h.head_size - 1, h.head_size / 2, rng.below(h.head_size)}) {
        request_head hp;
        parse_error ep;
        auto rp = parse_request(in.substr(0, k), lim, hp, ep);
        DMZ_FUZZ_CHECK(rp == result::need_more);
    }
    // A head object reused from earlier inputs (as a connection reuses its head) gives the
    // same result as a fresh one.
    static request_head reused;
    parse_error e3;
    DMZ_FUZZ_CHECK(parse_request(in, lim, reused, e3) == result::done);
    DMZ_FUZZ_CHECK(summary(reused) == expect);
    return 0;
}
