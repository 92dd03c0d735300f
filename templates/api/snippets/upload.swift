import Foundation

let broker = URL(string: "{{ base }}")!
let retryable: Set<Int> = [409, 429, 502, 503, 504]  // other errors need a fix first

struct Upload: Decodable { let id: String; let status: String; let upload_url: String? }
struct SignedURL: Decodable { let url: String }

/// Call the broker with the token; retry what may pass later, after Retry-After when given.
func call(_ request: URLRequest, token: String) async throws -> (Data, HTTPURLResponse) {
    var request = request
    request.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization")
    var attempt = 1
    while true {
        let (data, response) = try await URLSession.shared.data(for: request)
        let http = response as! HTTPURLResponse
        if !retryable.contains(http.statusCode) || attempt == 5 { return (data, http) }
        let wait = Double(http.value(forHTTPHeaderField: "Retry-After") ?? "") ?? pow(2, Double(attempt))
        try await Task.sleep(nanoseconds: UInt64(wait * 1_000_000_000))
        attempt += 1
    }
}

func uploadImage(_ jpeg: Data, token: String) async throws -> String {
    // 1. An upload URL. The same Idempotency-Key on every retry: never a second upload.
    var create = URLRequest(url: broker.appendingPathComponent("api/v1/uploads"))
    create.httpMethod = "POST"
    create.setValue("application/json", forHTTPHeaderField: "Content-Type")
    create.setValue(UUID().uuidString, forHTTPHeaderField: "Idempotency-Key")
    create.httpBody = try JSONSerialization.data(withJSONObject: ["metadata": ["album": "summer"]])
    let upload = try JSONDecoder().decode(Upload.self, from: try await call(create, token: token).0)

    // 2. The file, straight to Cloudflare: multipart, field "file", no token.
    let boundary = UUID().uuidString
    var send = URLRequest(url: URL(string: upload.upload_url!)!)
    send.httpMethod = "POST"
    send.setValue("multipart/form-data; boundary=\(boundary)", forHTTPHeaderField: "Content-Type")
    var body = Data("--\(boundary)\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".utf8)
    body.append(jpeg)
    body.append(Data("\r\n--\(boundary)--\r\n".utf8))
    _ = try await URLSession.shared.upload(for: send, from: body)

    // 3. Done: 200 once ready, 202 while the broker checks (ask again after Retry-After).
    var complete = URLRequest(url: broker.appendingPathComponent("api/v1/uploads/\(upload.id)/complete"))
    complete.httpMethod = "POST"
    for _ in 0..<30 {
        let (_, response) = try await call(complete, token: token)
        if response.statusCode != 202 { break }
        let wait = Double(response.value(forHTTPHeaderField: "Retry-After") ?? "") ?? 1
        try await Task.sleep(nanoseconds: UInt64(wait * 1_000_000_000))
    }

    // 4. A signed URL to show it.
    var components = URLComponents(url: broker.appendingPathComponent("api/v1/images/\(upload.id)/url"), resolvingAgainstBaseURL: false)!
    components.queryItems = [URLQueryItem(name: "variant", value: "{{ variant }}")]
    let (data, _) = try await call(URLRequest(url: components.url!), token: token)
    return try JSONDecoder().decode(SignedURL.self, from: data).url
}
